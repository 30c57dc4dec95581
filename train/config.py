"""Typed training configuration: a YAML file validated by pydantic, plus `key=value` overrides.

    cfg = load_config("tiny", ["optim.lr=1e-3", "elastic.fail=3@20"])

A config is a base YAML (a path, or the name of a file in `jaxsys.configs/train/`) with dotted
`key=value` overrides on top (values are parsed as YAML scalars). Unknown keys are errors that
name the valid keys; nothing is silently ignored.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import re
from pathlib import Path
from typing import Any, Literal, Sequence

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from jaxsys._overrides import dotted_overrides, set_dotted
from jaxsys.config_base import ConfigSection
from jaxsys.models.config import ConfigError, ModelConfig, RopeScaling
from jaxsys.shapes import pow2_bucket


class TrainConfigError(ValueError):
    """A training configuration that cannot run; the message says which key and why."""


class LMDataConfig(ConfigSection):
    """Where samples come from. Sample `i` of the run is a pure function of (seed, i)."""

    source: Literal["synthetic", "tokens", "text"] = "synthetic"
    paths: tuple[str, ...] = ()
    tokenizer: str = "bytes"
    """For `text`: `bytes` (UTF-8 bytes, ids 0-255, eos 256) or a folder with an HF tokenizer.json."""
    token_dtype: Literal["uint16", "uint32", "int32"] = "uint16"
    """dtype of raw `.bin` token files (`.npy` files carry their own)."""
    seq_len: int = Field(32, gt=0)
    global_batch: int = Field(32, gt=0)
    micro_batches: int = Field(16, gt=0)
    """The global batch is split into this many fixed micro-batches of consecutive examples; in
    elastic mode they are the unit of work spread over the devices and reduced in a fixed order."""
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> "LMDataConfig":
        if self.global_batch % self.micro_batches:
            raise ValueError(f"data.global_batch ({self.global_batch}) must be a multiple of "
                             f"data.micro_batches ({self.micro_batches})")
        if self.source != "synthetic" and not self.paths:
            raise ValueError(f"data.source={self.source!r} needs data.paths (files or globs)")
        return self

    @property
    def micro_size(self) -> int:
        return self.global_batch // self.micro_batches


class OptimConfig(ConfigSection):
    """optax AdamW (decoupled weight decay on matrices, not on norms/biases), warmup + schedule,
    gradient clipping by global norm."""

    lr: float = Field(3e-3, gt=0)
    schedule: Literal["constant", "cosine", "linear"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    decay_steps: int | None = Field(None, gt=0)
    """Length of the decay after warmup (default: the run's steps minus warmup)."""
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    b1: float = Field(0.9, ge=0, lt=1)
    b2: float = Field(0.95, ge=0, lt=1)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    clip_norm: float | None = Field(1.0, gt=0)


class MeshAxesConfig(ConfigSection):
    """Mesh axis sizes for the GSPMD step; -1 takes the remaining devices. (The elastic step lays
    its devices on one axis and only needs `tensor` to be 1.)"""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1

    @field_validator("data", "fsdp", "tensor")
    @classmethod
    def _pos(cls, v: int) -> int:
        if v == 0 or v < -1:
            raise ValueError("mesh axis sizes are positive or -1")
        return v


class CheckpointConfig(ConfigSection):
    """Orbax checkpoints: async save, keep-N, atomic commit; restorable onto any mesh."""

    dir: str | None = None
    every: int = Field(0, ge=0)
    """Save every N steps (0: only at the end of the run, when `dir` is set)."""
    keep: int = Field(3, gt=0)
    async_save: bool = True
    resume: bool = False
    """Start from the latest committed checkpoint in `dir` when there is one."""


class ElasticConfig(ConfigSection):
    """Elastic training (see `jaxsys.train.elastic`)."""

    enabled: bool = False
    fail: tuple[str, ...] = ()
    """Membership events `DEV@STEP`: device DEV (index into the run's device list) is lost during
    step STEP; the step is re-run on the survivors."""
    join: tuple[str, ...] = ()
    """`DEV@STEP`: device DEV (back) in service from step STEP on."""
    policy: Literal["consistent", "torchft"] = "consistent"
    """consistent: same global batch, canonical reduction, bitwise-identical run. torchft: the
    negative control - survivors average their own gradients and the lost device's examples
    are dropped (what TorchFT-style fault tolerance does)."""
    snapshot: bool = True
    """Keep a per-step in-memory snapshot (the pre-step state plus a replica of shard k on device
    k+1); recovery then loses no step and reads no disk."""
    replica_memory: Literal["auto", "device", "pinned_host"] = "auto"
    """Where replicas live: `auto` picks pinned_host memory on accelerators that have it (on CPU,
    device memory is host memory already)."""
    verify_every: int = Field(10, ge=0)
    """Every step checks the primary copy it reads against its checksums; every N steps all held
    copies (replicas included) are checked too (0: replicas only before a recovery)."""
    precompile: Literal["single_loss", "scheduled", "none"] = "single_loss"
    """Which device sets get executables compiled in the background: every set with one device
    lost (plus every rejoin), only the sets the event schedule reaches, or none."""
    membership: Literal["schedule", "distributed"] = "schedule"
    """`schedule`: events from fail/join; `distributed`: jax.distributed live-device checks."""
    chunk_size: int = Field(1024, gt=0)
    """Chunk length of the canonical (layout-independent) gradient-norm reduction; a power of two."""

    @field_validator("fail", "join", mode="before")
    @classmethod
    def _split(cls, v: Any) -> Any:
        if v is None:
            return ()
        if isinstance(v, (int, float)):
            raise ValueError(f"expected DEV@STEP (e.g. 3@20), got {v!r}")
        if isinstance(v, str):
            v = [v]
        out = []
        for item in v:
            out += [p.strip() for p in str(item).split(",") if p.strip()]
        from jaxsys.train.elastic.events import parse_event

        for item in out:
            parse_event(item, "fail")  # format check; device ranges are checked against the run
        return tuple(out)

    @field_validator("chunk_size")
    @classmethod
    def _power_of_two(cls, v: int) -> int:
        if pow2_bucket(v) != v:
            raise ValueError(f"chunk_size must be a power of two, got {v}")
        return v


_BYTE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_BUDGET = re.compile(r"([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)")


def parse_memory_budget(value: Any) -> int | float | None:
    """A memory budget as given in a config: bytes (`4000000000`, `4e9`, `512MiB`, `4GB`) -> int, or a
    fraction of the device's memory (`0.5`, `50%`) -> float in (0, 1]. A plain number up to 1 is a
    fraction, above 1 a byte count."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"a memory budget is bytes or a fraction, got {value!r}")
    if isinstance(value, (int, float)):
        number, unit = float(value), ""
    else:
        text = str(value).strip().lower().replace("_", "")
        if text.endswith("%"):
            try:
                pct = float(text[:-1])
            except ValueError:
                raise ValueError(f"memory budget {value!r}: a percentage is a number followed by %") from None
            if not 0 < pct <= 100:
                raise ValueError(f"memory budget {value!r}: a percentage of device memory is in (0, 100]")
            return pct / 100
        m = _BUDGET.fullmatch(text)
        if m is None or m.group(2) not in _BYTE_UNITS:
            raise ValueError(f"memory budget {value!r}: expected bytes (4e9, 512MiB, 4GB) or a fraction of "
                             "device memory (0.5, 50%)")
        number, unit = float(m.group(1)), m.group(2)
    if not number > 0 or number == float("inf"):
        raise ValueError(f"memory budget must be positive, got {value!r}")
    if unit:
        return int(number * _BYTE_UNITS[unit])
    return number if number <= 1 else int(number)


class MemoryConfig(ConfigSection):
    """Activation memory planning (`jaxsys.train.memory`): what the backward pass keeps on device,
    recomputes, or offloads to host memory, per named residual of the decoder's layers."""

    policy: Literal["auto", "keep", "remat", "offload"] = "keep"
    """keep: every residual kept (no checkpoint: the step as written). remat: every named residual
    recomputed in the backward pass, one layer at a time. offload: every named residual moved to
    host memory and back. auto: per residual, the fastest choice (predicted from a profile of the
    step) whose modelled peak fits `budget`."""
    budget: int | float | None = None
    """Device memory per device that the step may use: bytes (`4e9`, `512MiB`, `4GB`) or a fraction
    of the device's memory (`0.5`, `50%`). auto plans within it (default: all of the device's
    memory, which a CPU does not report); the fixed policies check their modelled peak against it.
    A budget that no plan meets is an error naming the smallest feasible one."""

    @field_validator("budget", mode="before")
    @classmethod
    def _budget(cls, v: Any) -> int | float | None:
        return parse_memory_budget(v)


class PipelineConfig(ConfigSection):
    """Pipeline parallelism (`jaxsys.train.pipeline`): the layers split into `stages` consecutive
    stages, `pipelines` data-parallel copies of the pipeline, the global batch in micro-batches
    scheduled GPipe or 1F1B. The step runs the same unit executables and the same fixed-order
    reduction on every layout, so every layout (and every recovery, see `recovery`) gives the same
    bits as the one-stage run."""

    enabled: bool = False
    stages: int = Field(2, gt=0)
    pipelines: int | None = Field(None, gt=0)
    """Data-parallel pipelines (default: as many as fit, devices // stages; devices past
    pipelines x stages hold only their shard of the train state)."""
    micro_batches: int | None = Field(None, gt=0)
    """Micro-batches per step (default: data.micro_batches): the unit of pipelining and of the
    fixed-order gradient sum."""
    schedule: Literal["gpipe", "1f1b"] = "1f1b"
    """gpipe: every forward of a stage before its backwards (keeps all micro-batches' activations);
    1f1b: a backward as soon as one is ready (stage s keeps at most stages - s micro-batches)."""
    partition: tuple[int, ...] | None = None
    """Layers per stage, first to last, e.g. [3, 1] (default: balanced, the first stages one layer
    more). The first stage also runs the embedding, the last the final norm and the head."""

    @model_validator(mode="after")
    def _check(self) -> "PipelineConfig":
        if self.partition is not None:
            if len(self.partition) != self.stages:
                raise ValueError(f"pipeline.partition {list(self.partition)} has {len(self.partition)} stages, "
                                 f"pipeline.stages is {self.stages}")
            if any(n < 1 for n in self.partition):
                raise ValueError(f"pipeline.partition {list(self.partition)}: every stage needs a layer")
        return self


class RecoveryConfig(ConfigSection):
    """What the pipelined trainer does when devices fail (`jaxsys.train.recovery`): a strategy
    that keeps the global batch, the gradient scale and every example's dropout key, so the run
    continues bit for bit as without the failure."""

    strategy: Literal["auto", "reroute", "redundant", "replan", "checkpoint"] = "auto"
    """auto: per failure, the strategy with the least expected time to finish under the
    performance model (measured unit times, the options below). reroute: a failed stage's
    micro-batches to its data-parallel peers. redundant: the neighbouring stage of the same
    pipeline also runs the failed stage. replan: a new pipelines x stages layout over the
    survivors. checkpoint: restore the last checkpoint onto the survivors. A fixed strategy that
    cannot cover a failure (reroute when a stage lost every copy) re-plans instead, and says so."""
    fail: tuple[str, ...] = ()
    """`DEV@STEP`: device DEV (index into the run's device list) is lost during step STEP; the
    step is re-run on the survivors."""
    join: tuple[str, ...] = ()
    """`DEV@STEP`: device DEV (back) in service from step STEP on (the layout is re-planned)."""
    snapshot: bool = True
    """Keep the pre-step state and a replica of shard k on device k+1 at every step, so an
    in-memory strategy loses no step; without it every failure restores the last checkpoint."""
    link_gbps: float = Field(5.0, gt=0)
    """Assumed bandwidth between devices and of checkpoint reads (GB/s), for the performance model."""
    device_memory_gib: float | None = Field(None, gt=0)
    """Memory per device for the model's feasibility check (default: what the device reports; a
    CPU reports none: the host's memory divided by the device count)."""

    @field_validator("fail", "join", mode="before")
    @classmethod
    def _split(cls, v: Any) -> Any:
        return _event_specs(v)


def _event_specs(v: Any) -> tuple[str, ...]:
    """`"3@20,5@30"`, a list of such strings, or None -> ("3@20", "5@30"), each checked for form."""
    from jaxsys.train.elastic.events import parse_event

    if v is None:
        return ()
    if isinstance(v, (int, float)):
        raise ValueError(f"expected DEV@STEP (e.g. 3@20), got {v!r}")
    out = [p.strip() for item in ([v] if isinstance(v, str) else v) for p in str(item).split(",") if p.strip()]
    for item in out:
        parse_event(item, "fail")
    return tuple(out)


def _check_pipeline(cfg: "LMTrainConfig") -> None:
    """Cross-section checks of `pipeline` and `recovery` (device counts are checked by the program)."""
    pc, rc = cfg.pipeline, cfg.recovery
    if not pc.enabled:
        if rc.fail or rc.join:
            raise ValueError("recovery.fail/recovery.join belong to the pipelined trainer (pipeline.enabled=true); "
                             "the elastic trainer reads elastic.fail/elastic.join")
        return
    if cfg.elastic.enabled:
        raise ValueError("pipeline.enabled and elastic.enabled name two different step programs (the pipelined "
                         "one recovers from failures itself, see recovery.*); set elastic.enabled=false")
    if cfg.mesh.tensor != 1:
        raise ValueError("the pipeline keeps every micro-batch's stage on one device (a tensor-parallel split of "
                         "a contraction changes its floating-point summation order); set mesh.tensor=1")
    if cfg.memory.policy != "keep" or cfg.memory.budget is not None:
        raise ValueError("memory.policy/memory.budget plan the GSPMD step; the pipelined step keeps each "
                         "layer's input (memory.policy=keep, no budget)")
    if cfg.model.tie_word_embeddings:
        raise ValueError("the pipeline does not run tied embeddings (the first and the last stage would share "
                         "the embedding and its gradient); set model.tie_word_embeddings=false")
    L = cfg.model.num_layers
    if pc.partition is not None and sum(pc.partition) != L:
        raise ValueError(f"pipeline.partition {list(pc.partition)} has {sum(pc.partition)} layers, the model {L}")
    if pc.stages > L:
        raise ValueError(f"pipeline.stages={pc.stages} but the model has {L} layers (a stage needs one)")
    M = pc.micro_batches or cfg.data.micro_batches
    if cfg.data.global_batch % M:
        raise ValueError(f"data.global_batch ({cfg.data.global_batch}) must be a multiple of "
                         f"pipeline.micro_batches ({M})")
    if pc.pipelines is not None and M < pc.pipelines:
        raise ValueError(f"{M} micro-batches cannot feed pipeline.pipelines={pc.pipelines}")


class LMTrainConfig(ConfigSection):
    """A causal-LM training run: the model, its data, optimizer, mesh, checkpoints and elastic
    behaviour (`load_config` builds one from YAML plus `key=value` overrides)."""

    model: ModelConfig
    data: LMDataConfig = LMDataConfig()
    optim: OptimConfig = OptimConfig()
    mesh: MeshAxesConfig = MeshAxesConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    elastic: ElasticConfig = ElasticConfig()
    memory: MemoryConfig = MemoryConfig()
    pipeline: PipelineConfig = PipelineConfig()
    recovery: RecoveryConfig = RecoveryConfig()
    steps: int = Field(100, gt=0)
    seed: int = 0
    """Root of parameter init and dropout keys."""
    dropout: float = Field(0.0, ge=0, lt=1)
    devices: int | None = Field(None, gt=0)
    """How many devices to use (the first N of jax.devices(); default all)."""
    metrics_out: str | None = None
    progress: bool = True

    model_config = ConfigDict(arbitrary_types_allowed=True)  # merged with ConfigSection's

    @field_validator("model", mode="before")
    @classmethod
    def _model(cls, v: Any) -> ModelConfig:
        if isinstance(v, ModelConfig):
            return v
        if not isinstance(v, dict):
            raise ValueError("model must be a mapping of ModelConfig fields")
        known = {f.name for f in dataclasses.fields(ModelConfig)}
        unknown = sorted(set(v) - known)
        if unknown:
            raise ValueError(f"unknown model keys {unknown}; known: {sorted(known)}")
        d = dict(v)
        if isinstance(d.get("rope_scaling"), dict):
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        if "eos_token_ids" in d:
            d["eos_token_ids"] = tuple(d["eos_token_ids"])
        try:
            return ModelConfig(**d)
        except (ConfigError, TypeError) as e:
            raise ValueError(str(e)) from None

    @model_validator(mode="after")
    def _check(self) -> "LMTrainConfig":
        if self.data.source == "synthetic" and self.model.vocab_size < 4:
            raise ValueError("the synthetic source needs vocab_size >= 4")
        if self.checkpoint.every and not self.checkpoint.dir:
            raise ValueError("checkpoint.every needs checkpoint.dir")
        if self.elastic.enabled and (self.mesh.tensor != 1):
            raise ValueError(
                "elastic mode keeps every micro-batch's compute on one device (a tensor-parallel "
                "split of a contraction changes the floating-point summation order with the device "
                "count); set mesh.tensor=1")
        _check_pipeline(self)
        if self.pipeline.enabled and (self.memory.policy != "keep" or self.memory.budget is not None):
            raise ValueError("memory.policy/memory.budget plan the GSPMD and elastic steps; the pipelined "
                             "step (pipeline.enabled) keeps every activation (memory.policy=keep, no budget)")
        return self

    def to_dict(self) -> dict[str, Any]:
        d = self.model_dump(exclude={"model"})
        m = dataclasses.asdict(self.model)
        m["eos_token_ids"] = list(self.model.eos_token_ids)
        d["model"] = m
        return d

    def replace(self, **changes: Any) -> "LMTrainConfig":
        """A validated copy with dotted keys changed: `cfg.replace(**{"optim.lr": 1e-3})`."""
        d = self.to_dict()
        for key, value in changes.items():
            set_dotted(d, key, value, error=TrainConfigError)
        return config_from_dict(d)


# ------------------------------------------------------------------------------------- loading
def resolve_config_path(name_or_path: str | Path) -> Path:
    """A path to a YAML file, or the name of a packaged config (`tiny` -> configs/train/tiny.yaml)."""
    p = Path(name_or_path).expanduser()
    if p.is_file():
        return p
    name = str(name_or_path)
    if not name.endswith((".yaml", ".yml")) and "/" not in name:
        res = importlib.resources.files("jaxsys.configs").joinpath("train", f"{name}.yaml")
        if res.is_file():
            return Path(str(res))
    known = sorted(p.name.removesuffix(".yaml") for p in
                   importlib.resources.files("jaxsys.configs").joinpath("train").iterdir()
                   if p.name.endswith(".yaml"))
    raise TrainConfigError(f"no config file {name_or_path!r}; packaged configs: {', '.join(known)}")


def _format_validation_error(e: ValidationError) -> str:
    lines = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"])
        if err["type"] == "extra_forbidden":
            section = loc.rsplit(".", 1)[0] if "." in loc else ""
            model = LMTrainConfig
            for part in section.split(".") if section else []:
                field = model.model_fields.get(part)
                model = field.annotation if field is not None else None
                if model is None or not isinstance(model, type) or not issubclass(model, BaseModel):
                    break
            known = sorted(model.model_fields) if isinstance(model, type) and issubclass(model, BaseModel) else []
            lines.append(f"unknown config key {loc!r}" + (f" (known: {', '.join(known)})" if known else ""))
        else:
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(lines)


def config_from_dict(d: dict[str, Any]) -> LMTrainConfig:
    try:
        return LMTrainConfig.model_validate(d)
    except ValidationError as e:
        raise TrainConfigError(_format_validation_error(e)) from None


def load_config(name_or_path: str | Path, overrides: Sequence[str] = ()) -> LMTrainConfig:
    """Read a YAML config and apply `key=value` overrides; raises TrainConfigError on bad input."""
    path = resolve_config_path(name_or_path)
    try:
        d = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise TrainConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(d, dict):
        raise TrainConfigError(f"{path}: a config is a mapping of sections")
    dotted_overrides(d, overrides, error=TrainConfigError, example="optim.lr=1e-3")
    return config_from_dict(d)


def apply_overrides(cfg: LMTrainConfig, overrides: Sequence[str]) -> LMTrainConfig:
    d = dotted_overrides(cfg.to_dict(), overrides, error=TrainConfigError, example="optim.lr=1e-3")
    return config_from_dict(d)


def lr_schedule(optim: OptimConfig, total_steps: int):
    """The optax schedule of `optim` for a run of `total_steps` steps."""
    import optax

    decay = optim.decay_steps or max(total_steps - optim.warmup_steps, 1)
    end = optim.lr * optim.min_lr_ratio
    if optim.schedule == "constant":
        main = optax.constant_schedule(optim.lr)
    elif optim.schedule == "cosine":
        main = optax.cosine_decay_schedule(optim.lr, decay, alpha=optim.min_lr_ratio)
    else:
        main = optax.linear_schedule(optim.lr, end, decay)
    if optim.warmup_steps == 0:
        return main
    warm = optax.linear_schedule(0.0, optim.lr, optim.warmup_steps)
    return optax.join_schedules([warm, main], [optim.warmup_steps])


def tokens_per_step(cfg: LMTrainConfig) -> int:
    return cfg.data.global_batch * cfg.data.seq_len


__all__ = ["CheckpointConfig", "ElasticConfig", "LMDataConfig", "LMTrainConfig", "MemoryConfig", "MeshAxesConfig",
           "OptimConfig", "PipelineConfig", "RecoveryConfig", "parse_memory_budget",
           "TrainConfigError", "apply_overrides", "config_from_dict", "load_config", "lr_schedule",
           "resolve_config_path", "tokens_per_step"]
