"""Save and restore model parameters with Orbax, onto any mesh."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax

from jaxsys.models import decoder
from jaxsys.models.config import ModelConfig, RopeScaling


def _cfg_to_json(cfg: ModelConfig) -> dict[str, Any]:
    import dataclasses

    d = dataclasses.asdict(cfg)
    d["eos_token_ids"] = list(cfg.eos_token_ids)
    return d


def _cfg_from_json(d: dict[str, Any]) -> ModelConfig:
    d = dict(d)
    if d.get("rope_scaling"):
        d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
    d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
    return ModelConfig(**d)


def save_params(path: str | os.PathLike, params: Any, cfg: ModelConfig) -> Path:
    """Write `params` (any sharding) and the config under `path` (a new folder)."""
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    if path.exists():
        raise FileExistsError(f"{path} exists; choose a new folder")
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path / "params", params)
        ckptr.wait_until_finished()
    (path / "model_config.json").write_text(json.dumps(_cfg_to_json(cfg), indent=1))
    return path


def restore_params(path: str | os.PathLike, mesh: jax.sharding.Mesh | None = None
                   ) -> tuple[ModelConfig, Any]:
    """Read parameters saved by `save_params`, placed on `mesh` by the logical rules (or one device)."""
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    cfg_file = path / "model_config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"{path} is not a jaxsys parameter checkpoint (no model_config.json)")
    cfg = _cfg_from_json(json.loads(cfg_file.read_text()))
    abstract = decoder.abstract_params(cfg)
    if mesh is not None:
        from jaxsys.sharding import tree_shardings

        shardings = tree_shardings(decoder.param_logical_axes(cfg), abstract, mesh)
    else:
        dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: dev, abstract)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    with ocp.StandardCheckpointer() as ckptr:
        params = ckptr.restore(path / "params", target)
    return cfg, params
