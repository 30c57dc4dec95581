"""Elastic training in the spirit of ElasWave (arXiv 2510.00606): lose or gain devices mid-run
without changing the math.

A device failure must be invisible in the numbers. After a membership change the run continues
with the *same* global batch, gradient scale, reduction order and per-example dropout masks, so
its losses and parameters are bitwise those of the run without the failure
(tests/test_elastic.py). The pieces:

* `canonical`   the layout-invariant step: fixed micro-batches, per-micro-batch gradients on one
                device each, an all-to-all and a fixed binary tree over the micro-batch index
                (a reduce-scatter whose order does not depend on N), a fixed-order gradient norm,
                per-example RNG, AdamW on flat fsdp shards.
* `layout`      the flat parameter vector over N devices; micro-batch plans (uneven splits).
* `snapshot`    per-step in-memory snapshot: the pre-step state plus a replica of shard k on
                device k+1 (pinned_host memory where the backend has it), checksums,
                verification and repair, fault injection.
* `planner`     transfers that build the new layout from surviving copies (no lost source,
                complete disjoint coverage, <= ceil(P / N') elements per destination);
                `transfer` runs them device to device.
* `compile`     executables for the likely device sets, compiled in the background and
                retargeted to the actual device set in about a millisecond.
* `events`, `membership`   `--fail DEV@STEP` / `--join DEV@STEP` schedules and the
                `jax.distributed` live-device check of multi-process jobs.
* `runtime`     `ElasticStep`, the step program that ties them together (the host loop,
                `jaxsys.train.trainer.Trainer`, drives it like the GSPMD step).
* `multiprocess` `DistributedElasticStep`: the same step in a multi-process `jax.distributed`
                job (CPU collectives between processes); a killed process's shards are rebuilt
                on the survivors from replicas held in other processes, a restarted process
                rejoins and receives its share from its peers, bitwise as without the failure.
* `launch`      `python -m jaxsys.train.elastic.launch`: such a job on one machine, with a
                kill/restart schedule.

Mesh axes: the elastic mode lays all live devices on one mesh axis, the one the rules table of
`jaxsys.sharding` gives the logical `FLAT` axis (the `data` and `fsdp` roles are merged: the state
is fully sharded and the micro-batches are spread over the same devices). `tensor` and `expert`
must be 1: splitting a contraction over devices changes its floating-point summation order with
the device count, and with it the bits. Pipeline parallelism and the choice among recovery
strategies are out of scope (see train/recovery/).

Across processes (`multiprocess`): the kill must land between steps (a process killed inside a
step leaves its peers in that step's collectives). What memory cannot repair (the coordinator
process lost, no layout of the survivors that fits, both copies of a shard lost) stops the job with
a checkpoint that the processes write shard by shard, and the launcher restarts the job from it.
"""

from __future__ import annotations


from jaxsys._lazy import lazy_exports

_LAZY = {
    "ElasticStep": "jaxsys.train.elastic.runtime",
    "DistributedElasticStep": "jaxsys.train.elastic.multiprocess",
    "BitFlip": "jaxsys.train.elastic.runtime",
    "Recovery": "jaxsys.train.elastic.runtime",
    "EventSchedule": "jaxsys.train.elastic.events",
    "EventSpecError": "jaxsys.train.elastic.events",
    "MembershipEvent": "jaxsys.train.elastic.events",
    "parse_events": "jaxsys.train.elastic.events",
    "DistributedMembership": "jaxsys.train.elastic.membership",
    "ScheduledMembership": "jaxsys.train.elastic.membership",
    "FlatLayout": "jaxsys.train.elastic.layout",
    "FlatSpec": "jaxsys.train.elastic.layout",
    "MicroBatchPlan": "jaxsys.train.elastic.layout",
    "Transfer": "jaxsys.train.elastic.planner",
    "TransferPlan": "jaxsys.train.elastic.planner",
    "UnrecoverableError": "jaxsys.train.elastic.planner",
    "plan_transfers": "jaxsys.train.elastic.planner",
    "check_plan": "jaxsys.train.elastic.planner",
    "ExecutableCache": "jaxsys.train.elastic.compile",
    "retarget": "jaxsys.train.elastic.compile",
}

__getattr__, __dir__, __all__ = lazy_exports("jaxsys.train.elastic", _LAZY)
