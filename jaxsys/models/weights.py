"""Load model weights: HF folders (`config.json` + `model.safetensors` or a sharded index) and GGUF
files (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K, dequantized with the `gguf` package).

Both paths produce the stacked numpy pytree of `decoder.param_shapes(cfg)`; `to_device` places it,
optionally sharded over a mesh by the logical axis names.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from jaxsys.models import decoder
from jaxsys.models.config import ConfigError, ModelConfig

SUPPORTED_GGUF_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K")


class WeightError(ValueError):
    """A weight file that cannot be loaded: missing, malformed, or not matching the config."""


def _check_shape(name: str, got: tuple[int, ...], want: tuple[int, ...]) -> None:
    if tuple(got) != tuple(want):
        raise WeightError(f"shape mismatch for tensor {name!r}: file has {tuple(got)}, "
                          f"the config expects {tuple(want)}")


class _Assembler:
    """Collects per-layer tensors into stacked arrays with shape checks and a completeness check."""

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg
        self.shapes = decoder.param_shapes(cfg)
        self.out: dict[str, Any] = {"layers": {}}
        self.filled: set[tuple[str, ...]] = set()
        self.dtype = np.float32

    def top(self, key: str, value: np.ndarray, src: str) -> None:
        _check_shape(src, value.shape, self.shapes[key])
        self.out[key] = value.astype(self.dtype)
        self.filled.add((key,))

    def layer(self, key: str, idx: int, value: np.ndarray, src: str, expert: int | None = None) -> None:
        full = self.shapes["layers"][key]
        if not 0 <= idx < self.cfg.num_layers:
            raise WeightError(f"tensor {src!r} names layer {idx}, the config has {self.cfg.num_layers} layers")
        arr = self.out["layers"].get(key)
        if arr is None:
            arr = self.out["layers"][key] = np.zeros(full, self.dtype)
        if expert is None:
            _check_shape(src, value.shape, full[1:])
            arr[idx] = value
            self.filled.add((key, str(idx)))
        else:
            _check_shape(src, value.shape, full[2:])
            arr[idx, expert] = value
            self.filled.add((key, str(idx), str(expert)))

    def finish(self) -> dict[str, Any]:
        missing = []
        for key in self.shapes:
            if key != "layers" and (key,) not in self.filled:
                missing.append(key)
        for key, shape in self.shapes["layers"].items():
            for i in range(self.cfg.num_layers):
                if key.startswith("we_"):
                    for e in range(shape[1]):
                        if (key, str(i), str(e)) not in self.filled:
                            missing.append(f"layers.{i}.{key}[expert {e}]")
                elif (key, str(i)) not in self.filled:
                    missing.append(f"layers.{i}.{key}")
        if missing:
            shown = ", ".join(missing[:8]) + (f" (+{len(missing) - 8} more)" if len(missing) > 8 else "")
            raise WeightError(f"the weight file lacks tensors the config needs: {shown}")
        return self.out


# ---------------------------------------------------------------------- HF safetensors

_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def _hf_tensor(asm: _Assembler, name: str, w: np.ndarray) -> bool:
    cfg = asm.cfg
    Hq, Hkv, Dh, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
    if name == "model.embed_tokens.weight":
        asm.top("embed", w, name)
        return True
    if name == "model.norm.weight":
        asm.top("final_norm", w, name)
        return True
    if name == "lm_head.weight":
        if not cfg.tie_word_embeddings:
            asm.top("lm_head", w.T, name)
        return True
    m = _HF_LAYER.match(name)
    if not m:
        return False
    i, rest = int(m.group(1)), m.group(2)
    heads = {"q": Hq, "k": Hkv, "v": Hkv}
    lay = asm.shapes["layers"]

    def t(key):  # a [out, in] linear stored transposed
        return lambda: tuple(reversed(lay[key][1:]))

    # HF name -> (our key, transform, the shape the file must have)
    simple = {
        "input_layernorm.weight": ("attn_norm", lambda x: x, lambda: (D,)),
        "post_attention_layernorm.weight": ("mlp_norm", lambda x: x, lambda: (D,)),
        "self_attn.o_proj.weight": ("wo", lambda x: x.T.reshape(Hq, Dh, D), lambda: (D, Hq * Dh)),
        "mlp.gate_proj.weight": ("w_gate", lambda x: x.T, t("w_gate")),
        "mlp.up_proj.weight": ("w_up", lambda x: x.T, t("w_up")),
        "mlp.down_proj.weight": ("w_down", lambda x: x.T, t("w_down")),
        "block_sparse_moe.gate.weight": ("router", lambda x: x.T, t("router")),
        "mlp.gate.weight": ("router", lambda x: x.T, t("router")),
        "mlp.shared_expert.gate_proj.weight": ("ws_gate", lambda x: x.T, t("ws_gate")),
        "mlp.shared_expert.up_proj.weight": ("ws_up", lambda x: x.T, t("ws_up")),
        "mlp.shared_expert.down_proj.weight": ("ws_down", lambda x: x.T, t("ws_down")),
        "mlp.shared_expert_gate.weight": ("ws_router", lambda x: x.reshape(-1), lambda: (1, D)),
    }
    for p in "qkv":
        n = heads[p]
        simple[f"self_attn.{p}_proj.weight"] = (f"w{p}", lambda x, n=n: x.T.reshape(D, n, Dh), lambda n=n: (n * Dh, D))
        simple[f"self_attn.{p}_proj.bias"] = (f"b{p}", lambda x, n=n: x.reshape(n, Dh), lambda n=n: (n * Dh,))
    if rest in simple:
        key, fn, file_shape = simple[rest]
        if key not in lay:
            return False
        _check_shape(name, w.shape, file_shape())
        asm.layer(key, i, fn(w), name)
        return True
    # per-expert tensors: Mixtral w1/w2/w3, Qwen2-MoE gate/up/down
    m2 = re.match(r"^(?:block_sparse_moe|mlp)\.experts\.(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$", rest)
    if m2:
        e, kind = int(m2.group(1)), m2.group(2)
        key = {"w1": "we_gate", "gate_proj": "we_gate", "w3": "we_up", "up_proj": "we_up",
               "w2": "we_down", "down_proj": "we_down"}[kind]
        if key not in asm.shapes["layers"]:
            return False
        _check_shape(name, w.shape, tuple(reversed(asm.shapes["layers"][key][2:])))
        asm.layer(key, i, w.T, name, expert=e)
        return True
    # fused experts (transformers 5 layout): gate_up_proj [E, 2F, D], down_proj [E, D, F]
    if rest.endswith("experts.gate_up_proj"):
        F = cfg.moe_intermediate_size
        _check_shape(name, w.shape, (cfg.num_experts, 2 * F, D))
        for e in range(cfg.num_experts):
            asm.layer("we_gate", i, w[e, :F].T, name, expert=e)
            asm.layer("we_up", i, w[e, F:].T, name, expert=e)
        return True
    if rest.endswith("experts.down_proj"):
        _check_shape(name, w.shape, (cfg.num_experts, D, cfg.moe_intermediate_size))
        for e in range(cfg.num_experts):
            asm.layer("we_down", i, w[e].T, name, expert=e)
        return True
    return False


def _safetensor_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        paths = [folder / fn for fn in files]
        for p in paths:
            if not p.exists():
                raise WeightError(f"{index} names {p.name}, which is missing from {folder}")
        return paths
    single = folder / "model.safetensors"
    if single.exists():
        return [single]
    raise WeightError(f"no model.safetensors or model.safetensors.index.json in {folder}")


def load_hf_folder(folder: str | os.PathLike, *, dtype: str = "float32") -> tuple[ModelConfig, dict[str, Any]]:
    from safetensors import safe_open

    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        raise WeightError(f"no config.json in {folder}")
    with open(cfg_path) as f:
        cfg = ModelConfig.from_hf(json.load(f), dtype=dtype)
    asm = _Assembler(cfg)
    ignored = []
    for path in _safetensor_files(folder):
        with safe_open(str(path), framework="numpy") as f:
            for name in f.keys():
                w = f.get_tensor(name)
                if w.dtype.kind == "V" or str(w.dtype) == "bfloat16":
                    w = w.astype(np.float32)
                if not _hf_tensor(asm, name, np.asarray(w, np.float32)):
                    ignored.append(name)
    if [n for n in ignored if "rotary_emb" not in n]:
        raise WeightError(f"unexpected tensors for {cfg.model_type}: {ignored[:5]}")
    return cfg, asm.finish()


# ---------------------------------------------------------------------- GGUF

def _reverse_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (interleaved rotary pairs -> rotate-half)."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def read_gguf(path: str | os.PathLike):
    import gguf

    path = Path(path)
    if not path.exists():
        raise WeightError(f"GGUF file not found: {path}")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # the gguf package raises bare ValueErrors on corrupt files
        raise WeightError(f"cannot read {path} as GGUF: {e}") from e


def gguf_metadata(reader) -> dict[str, Any]:
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            meta[key] = field.contents()
        except Exception:  # noqa: BLE001 - unreadable optional fields are skipped
            continue
    return meta


def dequantize(tensor) -> np.ndarray:
    import gguf

    qtype = gguf.GGMLQuantizationType(tensor.tensor_type)
    if qtype.name not in SUPPORTED_GGUF_TYPES:
        raise WeightError(f"tensor {tensor.name!r} uses quantization type {qtype.name}, which is not "
                          f"supported (supported: {', '.join(SUPPORTED_GGUF_TYPES)})")
    return np.asarray(gguf.quants.dequantize(tensor.data, qtype), np.float32)


_GGUF_LAYER = re.compile(r"^blk\.(\d+)\.(.+)\.(weight|bias)$")


def load_gguf(path: str | os.PathLike, *, dtype: str = "float32", reader=None
              ) -> tuple[ModelConfig, dict[str, Any], dict[str, Any]]:
    """Returns (config, numpy params, GGUF metadata)."""
    reader = reader or read_gguf(path)
    meta = gguf_metadata(reader)
    names = {t.name for t in reader.tensors}
    cfg = ModelConfig.from_gguf(meta, dtype=dtype)
    cfg = cfg.replace(tie_word_embeddings="output.weight" not in names)
    arch = meta["general.architecture"]
    Hq, Hkv, Dh, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
    asm = _Assembler(cfg)
    permute = arch == "llama"
    heads = {"q": Hq, "k": Hkv, "v": Hkv}
    for t in reader.tensors:
        w = dequantize(t)
        name = t.name
        if name == "token_embd.weight":
            asm.top("embed", w, name)
            continue
        if name == "output_norm.weight":
            asm.top("final_norm", w, name)
            continue
        if name == "output.weight":
            asm.top("lm_head", w.T, name)
            continue
        m = _GGUF_LAYER.match(name)
        if not m:
            if name == "rope_freqs.weight":
                raise ConfigError("GGUF rope_freqs (llama3 scaling tables) are not supported; load the HF folder")
            raise WeightError(f"unexpected GGUF tensor {name!r} for architecture {arch}")
        i, part, kind = int(m.group(1)), m.group(2), m.group(3)
        if part in ("attn_q", "attn_k", "attn_v"):
            p = part[-1]
            if kind == "bias":
                asm.layer(f"b{p}", i, w.reshape(heads[p], Dh), name)
                continue
            if permute and p in "qk":
                w = _reverse_permute(w, heads[p])
            asm.layer(f"w{p}", i, w.T.reshape(D, heads[p], Dh), name)
            continue
        table: dict[str, tuple[str, Callable[[np.ndarray], np.ndarray], bool]] = {
            "attn_norm": ("attn_norm", lambda x: x, False),
            "ffn_norm": ("mlp_norm", lambda x: x, False),
            "attn_output": ("wo", lambda x: x.T.reshape(Hq, Dh, D), False),
            "ffn_gate": ("w_gate", lambda x: x.T, False),
            "ffn_up": ("w_up", lambda x: x.T, False),
            "ffn_down": ("w_down", lambda x: x.T, False),
            "ffn_gate_inp": ("router", lambda x: x.T, False),
            "ffn_gate_exps": ("we_gate", lambda x: np.swapaxes(x, 1, 2), True),
            "ffn_up_exps": ("we_up", lambda x: np.swapaxes(x, 1, 2), True),
            "ffn_down_exps": ("we_down", lambda x: np.swapaxes(x, 1, 2), True),
            "ffn_gate_shexp": ("ws_gate", lambda x: x.T, False),
            "ffn_up_shexp": ("ws_up", lambda x: x.T, False),
            "ffn_down_shexp": ("ws_down", lambda x: x.T, False),
            "ffn_gate_inp_shexp": ("ws_router", lambda x: x.reshape(-1), False),
        }
        if part not in table:
            raise WeightError(f"unexpected GGUF tensor {name!r} for architecture {arch}")
        key, fn, per_expert = table[part]
        w = fn(w)
        if per_expert:
            _check_shape(name, w.shape, asm.shapes["layers"][key][1:])
            for e in range(w.shape[0]):
                asm.layer(key, i, w[e], name, expert=e)
        else:
            asm.layer(key, i, w, name)
    return cfg, asm.finish(), meta


# ---------------------------------------------------------------------- placement

def to_device(np_params: dict[str, Any], cfg: ModelConfig, mesh=None) -> dict[str, Any]:
    """Cast to the config dtype and place on device(s), sharded by logical axes when `mesh` is given."""
    import jax
    import jax.numpy as jnp

    dtype = jnp.dtype(cfg.dtype)
    if mesh is None:
        return jax.tree.map(lambda x: jnp.asarray(x, dtype), np_params)
    from jaxsys.sharding import tree_shardings

    shardings = tree_shardings(decoder.param_logical_axes(cfg), np_params, mesh)
    return jax.tree.map(lambda x, s: jax.device_put(np.asarray(x).astype(dtype), s), np_params, shardings)


def iter_tensor_names(path: str | os.PathLike) -> Iterable[str]:
    reader = read_gguf(path)
    return [t.name for t in reader.tensors]
