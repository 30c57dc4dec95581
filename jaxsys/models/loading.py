"""`load_model`: name or path -> config, parameters on device(s) (optionally sharded), tokenizer."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import jax

from jaxsys.models import decoder, registry, weights
from jaxsys.models.config import ModelConfig
from jaxsys.models.tokenizer import Tokenizer


@dataclasses.dataclass
class LoadedModel:
    name: str
    config: ModelConfig
    params: Any
    tokenizer: Tokenizer | None
    path: Path
    mesh: Any = None

    def __repr__(self) -> str:
        n = decoder.count_params(self.params)
        return f"LoadedModel({self.name!r}, {self.config.model_type}, {n / 1e6:.1f}M params, {self.config.dtype})"


def load_model(name_or_path: str | os.PathLike = registry.DEFAULT_MODEL, *, dtype: str = "float32",
               mesh: jax.sharding.Mesh | None = None) -> LoadedModel:
    """Load a named model, an HF folder (config.json + safetensors + tokenizer.json) or a GGUF file.

    mesh: place the parameters sharded by the logical rules table (default: one device).
    """
    path = registry.resolve(name_or_path)
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if (path / "config.json").exists():
            cfg, np_params = weights.load_hf_folder(path, dtype=dtype)
            tok = Tokenizer.from_folder(path) if (path / "tokenizer.json").exists() else None
        elif len(ggufs) == 1:
            path = ggufs[0]
        else:
            raise weights.WeightError(f"{path} holds neither config.json nor exactly one .gguf file")
    if path.is_file():
        if path.suffix != ".gguf":
            raise weights.WeightError(f"{path}: expected a .gguf file or an HF model folder")
        reader = weights.read_gguf(path)
        cfg, np_params, meta = weights.load_gguf(path, dtype=dtype, reader=reader)
        tok = Tokenizer.from_gguf_metadata(meta)
    if tok is not None and tok.eos_token_ids:
        cfg = cfg.replace(eos_token_ids=tuple(dict.fromkeys(cfg.eos_token_ids + tok.eos_token_ids)))
    params = weights.to_device(np_params, cfg, mesh)
    return LoadedModel(name=str(name_or_path), config=cfg, params=params, tokenizer=tok, path=path, mesh=mesh)
