"""Decode instances behind a router, with remaining-length-aware rescheduling (ARES/STAR).

`sim` is a discrete-event simulator (SimPy) of decode instances with live KV migration; its
instance costs come from `hardware` (a step-time model fitted to our engine by `calibrate`, or a
stated H100-like roofline); `workload` replays our own generations with the predictions each
length predictor made for them; `policies` holds round-robin, least-KV, Llumnix-style and ours.

    from jaxsys.serve.cluster import SimConfig, Workload, h100_like, make_policy, poisson_trace, simulate
    result = simulate(workload, poisson_trace(workload.size, 2000.0, 20_000), h100_like(),
                      make_policy("ours"), SimConfig(num_instances=64))
    print(result.summary())          # simulated: p50/p99 TPOT, TTFT, SLO attainment, migrations

The real thing (issue 18 D): `instances` builds engine instances on sub-meshes of the devices,
`router.Cluster` dispatches to them and rebalances them with the same policies, `migration` moves
a running request's KV pages between instances (or recomputes it elsewhere when its instance
stops), `validation` replays a trace on the real cluster and compares it with the simulator, and
`serving.ClusterLLM` puts the cluster behind the OpenAI server (`jaxsys serve --instances N`).
`sweep` is the simulated policy comparison over instance counts and loads (`jaxsys bench cluster`).

    instances = make_instances(model, 4, devices_per_instance=2, predictor=head)
    cluster = Cluster(instances, "ours")
    outs = cluster.generate(prompt_ids, SamplingParams(max_tokens=64))
"""

from jaxsys._lazy import lazy_exports

_LAZY = {
    "Calibration": "jaxsys.serve.cluster.calibrate",
    "measure_engine": "jaxsys.serve.cluster.calibrate",
    "cpu_calibrated": "jaxsys.serve.cluster.calibrate",
    "HardwareParams": "jaxsys.serve.cluster.hardware",
    "h100_like": "jaxsys.serve.cluster.hardware",
    "SimConfig": "jaxsys.serve.cluster.sim",
    "SimResult": "jaxsys.serve.cluster.sim",
    "simulate": "jaxsys.serve.cluster.sim",
    "Workload": "jaxsys.serve.cluster.workload",
    "Trace": "jaxsys.serve.cluster.workload",
    "poisson_trace": "jaxsys.serve.cluster.workload",
    "make_policy": "jaxsys.serve.cluster.policies",
    "POLICIES": "jaxsys.serve.cluster.policies",
    "Instance": "jaxsys.serve.cluster.instances",
    "make_instances": "jaxsys.serve.cluster.instances",
    "Cluster": "jaxsys.serve.cluster.router",
    "MigrationRecord": "jaxsys.serve.cluster.migration",
    "migrate": "jaxsys.serve.cluster.migration",
    "ClusterLLM": "jaxsys.serve.cluster.serving",
    "SweepConfig": "jaxsys.serve.cluster.sweep",
    "replay": "jaxsys.serve.cluster.validation",
}
__getattr__, __dir__, __all__ = lazy_exports("jaxsys.serve.cluster", _LAZY)
