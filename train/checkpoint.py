"""Train-state checkpoints with Orbax: async save, keep-N, atomic commit, restore onto any mesh.

A checkpoint is a step directory with two items:

* `state`: {"params", "mu", "nu"} parameter-shaped trees (float32) and "count" (the optimizer
  step count), written with `StandardSave` from whatever sharding the trainer holds;
* `meta`: JSON: the step, the config, the device ids of the run that wrote it, a format version.

The on-disk form is the model's parameter tree, not a layout: the GSPMD trainer (any data x fsdp
x tensor mesh) and the elastic trainer (any device count) both restore any checkpoint, each onto
its own shardings. Orbax writes a step into a temporary directory and renames it when complete,
so a save that dies midway leaves the previous committed step as the latest restorable one
(tested by killing a saving process).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax

FORMAT = "jaxsys.train/1"


class CheckpointManager:
    """Thin wrapper of `orbax.checkpoint.CheckpointManager` for the train state."""

    def __init__(self, directory: str | Path, *, keep: int = 3, async_save: bool = True,
                 read_only: bool = False):
        import orbax.checkpoint as ocp

        self.directory = Path(directory).expanduser().absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=not read_only,
            read_only=read_only)
        self._mgr = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def save(self, step: int, state: dict[str, Any], meta: dict[str, Any]) -> bool:
        """Start saving `state` at `step` (returns once device buffers are copied to host when
        async); the step becomes visible to `latest_step` only when fully committed."""
        import orbax.checkpoint as ocp

        meta = {"format": FORMAT, "step": int(step), **meta}
        return self._mgr.save(int(step), args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

    def latest_step(self) -> int | None:
        return self._mgr.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._mgr.all_steps())

    def restore(self, abstract_state: dict[str, Any], step: int | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
        """Restore `step` (default: latest committed) onto the shardings in `abstract_state`
        (a tree of `jax.ShapeDtypeStruct(shape, dtype, sharding=...)`)."""
        import orbax.checkpoint as ocp

        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"no committed checkpoint in {self.directory}")
        out = self._mgr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        meta = dict(out["meta"])
        if meta.get("format") != FORMAT:
            raise ValueError(f"{self.directory}/{step} is not a {FORMAT} checkpoint")
        return out["state"], meta

    def read_meta(self, step: int | None = None) -> dict[str, Any]:
        import orbax.checkpoint as ocp

        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no committed checkpoint in {self.directory}")
        return dict(self._mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])

    def wait(self) -> None:
        self._mgr.wait_until_finished()

    def close(self) -> None:
        self._mgr.wait_until_finished()
        self._mgr.close()

    def __enter__(self) -> "CheckpointManager":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) mirroring a tree of arrays."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)
