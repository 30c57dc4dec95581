"""`ClusterLLM`: N engine instances behind the router, with `ServingLLM`'s serving surface.

`jaxsys serve --instances N` serves one of these through the same OpenAI-compatible server
(`jaxsys.serve.api.server.create_app`): `submit` / `cancel` / `start` / `shutdown` go to the
`router.Cluster` (one thread per instance, a rebalancer thread), and `scheduler` is a read-only
view summed over the alive instances' schedulers, for the server's gauges and health check.
`register_metrics(registry)` adds the cluster's own series to the server's `/metrics`: per
instance (label `instance`) running and waiting requests, KV tokens and pages in use, whether it
is alive and how many remaining-length predictions it made; for the whole cluster the
migrations, the bytes they moved and the requests recomputed after their instance stopped.
"""

from __future__ import annotations

from typing import Callable, Sequence

from jaxsys.models import LoadedModel, load_model
from jaxsys.sampling import SamplingParams
from jaxsys.serve.cluster.instances import Instance, make_instances
from jaxsys.serve.cluster.router import Cluster
from jaxsys.serve.engine.engine import EngineConfig
from jaxsys.serve.length.predictor import LengthPredictor
from jaxsys.serve.scheduler.request import Request, RequestOutput

__all__ = ["ClusterLLM"]


class _PagesView:
    def __init__(self, cluster: Cluster):
        self._cluster = cluster

    @property
    def num_free(self) -> int:
        return sum(i.scheduler.pages.num_free for i in self._cluster.alive)


class _RadixView:
    def __init__(self, cluster: Cluster):
        self._cluster = cluster

    @property
    def hit_rate(self) -> float:
        lookups = sum(i.scheduler.radix.lookup_tokens for i in self._cluster.instances)
        return sum(i.scheduler.radix.hit_tokens for i in self._cluster.instances) / lookups if lookups else 0.0


class _StatsView:
    """The server's counters over every instance; `observers` (the server's TTFT/TPOT histograms)
    hear every instance's observations."""

    def __init__(self, cluster: Cluster):
        self._cluster = cluster
        self.observers: list[Callable[[str, float], None]] = []
        for inst in cluster.instances:
            inst.scheduler.stats.observers.append(self._observe)

    def _observe(self, kind: str, seconds: float) -> None:
        for fn in self.observers:
            fn(kind, seconds)

    def _total(self, name: str):
        return sum(getattr(i.scheduler.stats, name) for i in self._cluster.instances)

    @property
    def acceptance_rate(self) -> float:
        proposed = self._total("spec_proposed")
        return self._total("spec_accepted") / proposed if proposed else 0.0

    @property
    def tokens_per_step(self) -> float:
        emitted, rows = self._total("spec_emitted"), self._total("decode_tokens")
        if not emitted:
            return 1.0 if rows else 0.0
        return emitted / rows

    @property
    def generated_tokens(self) -> int:
        return self._total("generated_tokens")


class _SchedulerView:
    """What the server reads of `ServingLLM.scheduler`, over the cluster's instances."""

    def __init__(self, cluster: Cluster):
        self._cluster = cluster
        self.stats = _StatsView(cluster)
        self.radix = _RadixView(cluster)
        self.pages = _PagesView(cluster)

    @property
    def queue_length(self) -> int:
        return sum(i.scheduler.queue_length for i in self._cluster.alive)

    @property
    def num_running(self) -> int:
        return sum(i.scheduler.num_running for i in self._cluster.alive)

    def has_work(self) -> bool:
        return self._cluster.has_work()

    @property
    def error(self) -> Exception | None:
        return None if self._cluster.alive else RuntimeError("no serving instance is alive")


class ClusterLLM:
    """`instances` engine instances of `model`, each on `devices_per_instance` devices (default:
    the devices split evenly), behind a router running `policy` (round_robin, least_kv, llumnix,
    ours; `policy_kw` are its fields, e.g. threshold=0.1). A trained `predictor`
    (`LengthPredictor`) runs in every instance every `predict_every` decode steps; "ours" without
    one balances on current load, with a warning."""

    def __init__(self, model: str | LoadedModel = "smollm2-135m-instruct", *, instances: int = 4,
                 devices_per_instance: int | None = None, config: EngineConfig = EngineConfig(),
                 policy: str = "least_kv", predictor: LengthPredictor | None = None, predict_every: int = 8,
                 dtype: str = "float32", **policy_kw):
        self.model = model if isinstance(model, LoadedModel) else load_model(model, dtype=dtype)
        self.name = self.model.name
        self.tokenizer = self.model.tokenizer
        self.cluster = Cluster(make_instances(self.model, instances, devices_per_instance=devices_per_instance,
                                              config=config, predictor=predictor, predict_every=predict_every),
                               policy, **policy_kw)
        self.scheduler = _SchedulerView(self.cluster)

    @property
    def instances(self) -> list[Instance]:
        return self.cluster.instances

    def start(self) -> None:
        self.cluster.start()

    def shutdown(self) -> None:
        self.cluster.shutdown()

    def submit(self, prompt_ids: Sequence[int], sampling: SamplingParams,
               on_output: Callable[[RequestOutput], None], request_id: str | None = None) -> Request:
        """Dispatch a request by the policy; raises `RequestError` (a 400) when it fits no instance."""
        return self.cluster.submit(prompt_ids, sampling, on_output, request_id)

    def cancel(self, request_id: str) -> None:
        self.cluster.cancel(request_id)

    def register_metrics(self, registry) -> None:
        """The cluster's series on the server's Prometheus registry (see the module docstring)."""
        from prometheus_client import Gauge

        cluster = self.cluster
        per_instance = {"running": "requests decoding", "waiting": "requests queued", "kv_tokens": "KV tokens held",
                        "used_pages": "KV pages in use", "alive": "1 while the instance serves"}
        for key, doc in per_instance.items():
            g = Gauge(f"jaxsys_instance_{key}", f"per instance: {doc}", ["instance"], registry=registry)
            for inst in cluster.instances:
                g.labels(str(inst.index)).set_function(lambda inst=inst, key=key: float(_load(inst)[key]))
        g = Gauge("jaxsys_instance_length_predictions", "per instance: remaining-length predictions made",
                  ["instance"], registry=registry)
        for inst in cluster.instances:
            g.labels(str(inst.index)).set_function(
                lambda inst=inst: float(inst.tracker.predictions_made if inst.tracker is not None else 0))
        Gauge("jaxsys_migrations", "requests migrated between instances (KV pages moved)",
              registry=registry).set_function(lambda: len(cluster.migrations))
        Gauge("jaxsys_migrated_bytes", "KV bytes moved by migrations", registry=registry).set_function(
            lambda: sum(m.bytes for m in cluster.migrations))
        Gauge("jaxsys_recomputed_requests", "requests re-dispatched after their instance stopped",
              registry=registry).set_function(lambda: cluster.recomputed)


def _load(inst: Instance) -> dict:
    with inst.locked():
        return inst.load()
