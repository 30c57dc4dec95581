"""Recovery after a device failure in a data x pipeline job, in the spirit of Odyssey
(arXiv 2508.21613): four strategies that keep the math, a performance model that predicts what
each costs, and a chooser.

* `strategies`  reroute (ReCycle-like), re-plan (Oobleck-like), redundant computation
                (Bamboo-like) and checkpoint restart, as plans and as state transformations of a
                `jaxsys.train.pipeline.PipelineRun`; each keeps the global batch, the gradient
                scale and the per-example RNG, so the run continues bitwise as without the failure.
* `model`       step time, memory and recovery cost of a plan; expected time to finish; the
                layout search and the per-failure choice.
* `simulate`    (the module; `simulate.simulate` runs one policy on one trace) a SimPy cluster (32 and 256 devices, Poisson and bursty failure traces) that
                compares the policies. Simulated.
"""

from __future__ import annotations

from jaxsys._lazy import lazy_exports

_LAZY = {
    "load_cluster": "jaxsys.train.recovery.model",
    "ClusterConfig": "jaxsys.train.recovery.model",
    "Costs": "jaxsys.train.recovery.model",
    "Hardware": "jaxsys.train.recovery.model",
    "Layout": "jaxsys.train.recovery.model",
    "estimate": "jaxsys.train.recovery.model",
    "options": "jaxsys.train.recovery.model",
    "choose": "jaxsys.train.recovery.model",
    "search_layouts": "jaxsys.train.recovery.model",
    "make_trace": "jaxsys.train.recovery.simulate",
    "POLICIES": "jaxsys.train.recovery.simulate",
    "RecoveryError": "jaxsys.train.recovery.strategies",
    "recover_in_memory": "jaxsys.train.recovery.strategies",
    "recover_from_checkpoint": "jaxsys.train.recovery.strategies",
}

__getattr__, __dir__, __all__ = lazy_exports("jaxsys.train.recovery", _LAZY)
