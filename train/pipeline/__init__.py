"""Pipeline parallelism with the canonical step's math: layers partitioned into stages (uneven
partitions allowed), micro-batches scheduled GPipe or 1F1B, composed with data parallelism and the
fully sharded (fsdp) flat train state, bitwise equal to the one-device run.

* `partition`  `StagePartition` (layers per stage) and `StageMap` (where each unit's parameters
               live in the flat train state).
* `schedule`   `WorkPlan` (which device computes each micro-batch at each stage) and
               `compile_schedule` (rounds of ops, GPipe or 1F1B; bubble and memory counts).
* `units`      the decoder as unit executables (embedding, layer, head) compiled once and run
               as the same code on every device: why the bits do not depend on the partition.
* `step`       the gather and update programs and the host-driven schedule.
* `runtime`    `PipelineRun`: a layout, the train state on it, one call per step.
* `program`    `PipelineStep`: the trainer's step program (`pipeline.enabled`), with recovery.

Tensor parallelism is not composed with the pipeline: splitting a contraction over devices
changes its floating-point summation order (the canonical step forbids it for the same reason),
and the performance model (`jaxsys.train.recovery.model`) treats tp as a layout dimension only.
"""

from __future__ import annotations

from jaxsys._lazy import lazy_exports

_LAZY = {
    "StagePartition": "jaxsys.train.pipeline.partition",
    "StageMap": "jaxsys.train.pipeline.partition",
    "PartitionError": "jaxsys.train.pipeline.partition",
    "WorkPlan": "jaxsys.train.pipeline.schedule",
    "ScheduleTables": "jaxsys.train.pipeline.schedule",
    "ScheduleError": "jaxsys.train.pipeline.schedule",
    "compile_schedule": "jaxsys.train.pipeline.schedule",
    "UnitPrograms": "jaxsys.train.pipeline.units",
    "PipelineSetup": "jaxsys.train.pipeline.runtime",
    "PipelineLayout": "jaxsys.train.pipeline.runtime",
    "PipelineRun": "jaxsys.train.pipeline.runtime",
    "PipelineStep": "jaxsys.train.pipeline.program",
}

__getattr__, __dir__, __all__ = lazy_exports("jaxsys.train.pipeline", _LAZY)
