"""Remaining-length data from the serving model itself (ARES/STAR, arXiv 2510.13668).

What a remaining-length predictor learns from: the serving model generates (sampled, several seeds)
on real prompts, and every `capture_every` decode steps we log, for each running request, the
hidden state of one chosen layer, the final-norm hidden state, and the number of tokens it has
generated so far (`g`). When the request finishes after `n` tokens the true remaining length of
each logged step is `n - g`.

How the hidden states are produced. This module runs its own batched, jitted decode loop over
`jaxsys.models.decoder.forward(..., return_hidden=True)` with a paged KV cache: the same model
and the same math as the engine's decode step, and `jaxsys.sampling.sample` for the tokens. (When
serving, the engine's own `decode_with_hidden` step gives the head the same layer-l vector:
`jaxsys.serve.length.serving`; both are tested against the same cache-free reference.)

- final-norm hidden: `forward`'s `return_hidden` output of the decode step itself, the vector the
  LM head reads ([D], with the final RMSNorm gain).
- layer-l hidden: the residual stream after layer `l`, RMS-normalised without a gain
  (`x / rms(x)`). `forward` does not expose intermediate layers, so on capture steps the same
  tokens run through the model with every layer after `l` made an exact identity (its attention
  output and MLP down projections zeroed, so the residual passes through unchanged) and the final
  norm's gain set to 1, over the same KV cache (read only: the pass's cache writes and logits are
  unused and compiled away). It masks the new token's cache slot and attends the new K/V
  directly, so it sees exactly what the full step saw. (Running a model truncated to `l` layers
  instead would need a copy of the cache's first `l` layers, which costs more than a step.)
  Captures happen on global steps (every `capture_every` steps for the whole batch), so the extra
  cost is about one decode step in `capture_every`.
- prompt features (for the prompt-only baseline, and g = 0): the same two hidden states at every
  prompt position from a cache-free pass, mean-pooled, plus the last position's.

Layout of the cache folder (`length_data_dir()`/<run>/): `manifest.json` (configuration, model,
provenance), `prompts/PPPPP.npz` (prompt features) and `gens/PPPPP_sS.npz` (one generation:
token ids, finish reason, captured g and hidden states, float16). Each file is written atomically
once complete, so an interrupted run resumes where it stopped (`generate_length_data` skips what
exists). `load_length_data` assembles the files into arrays with the train/dev/test split, which
is by prompt (a hash of the prompt's key), so no prompt's generations straddle two splits.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import random
import time
from collections import deque
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import numpy as np
from pydantic import field_validator

from jaxsys.config_base import ConfigSection

SOURCES = ("gsm8k", "mt_bench", "grbench")
SPLITS = ("train", "dev", "test")
PAGE_SIZE = 16

__all__ = ["LengthData", "LengthDataConfig", "Prompt", "SOURCES", "SPLITS", "generate_length_data",
           "latest_run", "length_data_dir", "load_length_data", "load_prompts", "shared_data_dir", "split_of"]


def shared_data_dir() -> Path:
    """The shared data folder: `$JAXSYS_DATA_DIR`, else `<project root>/../shared/data`."""
    env = os.environ.get("JAXSYS_DATA_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[2].parent / "shared" / "data"


def length_data_dir() -> Path:
    """`$JAXSYS_CACHE_DIR/length_data`, else `$XDG_CACHE_HOME/jaxsys/length_data`, else
    `~/.cache/jaxsys/length_data`."""
    env = os.environ.get("JAXSYS_CACHE_DIR")
    if env:
        return Path(env) / "length_data"
    return Path(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache"))) / "jaxsys" / "length_data"


@dataclasses.dataclass(frozen=True)
class Prompt:
    key: str  # "<source>:<id>", stable across runs; decides the split
    source: str  # one of SOURCES
    text: str  # the user message (wrapped in the chat template when tokenized)


def split_of(key: str, fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)) -> str:
    """train / dev / test by a hash of the prompt's key: stable, and independent of which other
    prompts were chosen."""
    u = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64
    return SPLITS[0] if u < fractions[0] else SPLITS[1] if u < fractions[0] + fractions[1] else SPLITS[2]


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing. The prompts cannot be generated; they live in the shared "
                                "data folder (see ../shared/data/README.md), found via $JAXSYS_DATA_DIR or "
                                "<project>/../shared/data")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_prompts(counts: dict[str, int], *, data_dir: Path | None = None, seed: int = 0) -> list[Prompt]:
    """`counts[source]` prompts of each source, drawn without replacement (seeded), interleaved
    across sources so that any prefix of the list covers all of them.

    gsm8k: GSM8K test questions; mt_bench: the first turn of each MT-Bench question; grbench: the
    GRBench questions of all ten domains (their key names the domain).
    """
    root = Path(data_dir) if data_dir is not None else shared_data_dir()
    unknown = set(counts) - set(SOURCES)
    if unknown:
        raise ValueError(f"unknown prompt source(s) {sorted(unknown)}; known: {list(SOURCES)}")
    pools: dict[str, list[Prompt]] = {}
    if counts.get("gsm8k"):
        rows = _read_jsonl(root / "prompts" / "gsm8k_test.jsonl")
        pools["gsm8k"] = [Prompt(f"gsm8k:{i}", "gsm8k", r["question"]) for i, r in enumerate(rows)]
    if counts.get("mt_bench"):
        rows = _read_jsonl(root / "prompts" / "mt_bench_questions.jsonl")
        pools["mt_bench"] = [Prompt(f"mt_bench:{r['question_id']}", "mt_bench", r["turns"][0]) for r in rows]
    if counts.get("grbench"):
        folder = root / "glm" / "grbench"
        files = sorted(folder.glob("*.jsonl"))
        if not files:
            _read_jsonl(folder / "amazon.jsonl")  # raises the missing-data error
        pools["grbench"] = [Prompt(f"grbench:{p.stem}:{r['qid']}", "grbench", r["question"])
                            for p in files for r in _read_jsonl(p)]
    rng = random.Random(seed)
    chosen: dict[str, list[Prompt]] = {}
    for source, pool in pools.items():
        n = counts[source]
        if n > len(pool):
            raise ValueError(f"asked for {n} {source} prompts; the data has {len(pool)}")
        chosen[source] = rng.sample(pool, n)
    out: list[Prompt] = []
    longest = max((len(v) for v in chosen.values()), default=0)
    for i in range(longest):  # interleave proportionally: position i of each source in turn
        for source in SOURCES:
            lst = chosen.get(source, [])
            j0, j1 = i * len(lst) // longest, (i + 1) * len(lst) // longest
            out.extend(lst[j0:j1])
    return out


class LengthDataConfig(ConfigSection):
    """What to generate. Changing any field starts a new run folder (see `run_name`)."""

    model: str = "smollm2-135m-instruct"
    prompts: dict[str, int] = {"gsm8k": 200, "mt_bench": 80, "grbench": 200}
    prompt_seed: int = 0
    seeds: int = 3  # sampled generations per prompt
    max_new_tokens: int = 512
    max_prompt_tokens: int = 512  # longer prompts are skipped (listed in the manifest)
    capture_every: int = 8  # log hidden states every k decode steps
    hidden_layer: int | None = None  # layer l whose output is logged; None: 2/3 of the depth
    temperature: float = 0.7
    top_k: int = 256  # sampling candidates (a full-vocabulary sort dominates a CPU decode step)
    top_p: float = 0.9
    slots: int = 32  # requests decoded together (a finished one is replaced at once)

    @field_validator("seeds", "max_new_tokens", "max_prompt_tokens", "capture_every", "slots", "top_k")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"must be >= 1, got {v}")
        return v

    @field_validator("prompts")
    @classmethod
    def _sources(cls, v: dict[str, int]) -> dict[str, int]:
        bad = set(v) - set(SOURCES)
        if bad:
            raise ValueError(f"unknown prompt source(s) {sorted(bad)}; known: {list(SOURCES)}")
        if any(n < 0 for n in v.values()) or not any(v.values()):
            raise ValueError(f"prompt counts must be >= 0 and not all zero, got {v}")
        return v

    def layer(self, num_layers: int) -> int:
        layer = self.hidden_layer if self.hidden_layer is not None else max(1, round(2 * num_layers / 3))
        if not 1 <= layer <= num_layers:
            raise ValueError(f"hidden_layer must be in [1, {num_layers}] for this model, got {layer}")
        return layer

    def run_name(self) -> str:
        """A readable, content-addressed folder name for this configuration."""
        digest = hashlib.sha256(self.model_dump_json().encode()).hexdigest()[:10]
        name = Path(self.model).name.replace("/", "_")
        return f"{name}-{self.max_new_tokens}tok-{digest}"


def _seed_of(prompt_index: int, seed_index: int) -> int:
    return (seed_index * 1_000_003 + prompt_index * 7919 + 17) % (2**31 - 1)


# ---------------------------------------------------------------------------------------------
# The decode loop


class _StepFns(NamedTuple):
    decode: Callable  # (params, cache, tokens_B, positions_B, page_table, kv_lens, temp, top_p, seed)
    #                   -> (next_B, cache, final-norm hidden [B, D]); the cache is donated
    layer_hidden: Callable  # (params_l, cache, tokens_B, positions_B, page_table, kv_lens) -> [B, D]
    prefill: Callable  # (params, cache, tokens_1xT, positions_1xT, page_table, kv_lens, last_1, temp,
    #                    top_p, seed) -> (next_1, cache); the cache is donated
    prompt_hidden: Callable  # (params, params_l, tokens_1xT, positions_1xT) -> ([T, D] layer-l, [T, D] final)


@functools.lru_cache(maxsize=8)
def _step_fns(mc, top_k: int) -> _StepFns:
    """The jitted steps of the capture loop, one set per (model config, top_k) and process, so
    several runs in one process share their compilations."""
    import jax
    import jax.numpy as jnp

    from jaxsys.models import decoder
    from jaxsys.models.kv_cache import AttentionMetadata
    from jaxsys.sampling import sample

    def pick(logits_BxV, temp, top_p, seed, kv_lens):
        """Top-k candidates, then `sample` (temperature, top-p, per-request seed) among them."""
        top_v_BxK, top_i_BxK = jax.lax.top_k(logits_BxV, top_k)
        zeros_B = jnp.zeros(temp.shape, jnp.int32)
        choice_B = sample(top_v_BxK, temp, zeros_B, top_p, seed, kv_lens)
        return jnp.take_along_axis(top_i_BxK, choice_B[:, None], axis=1)[:, 0]

    def decode(params, cache, tokens_B, positions_B, page_table, kv_lens, temp, top_p, seed):
        meta = AttentionMetadata(page_table, kv_lens)
        logits, cache, h_Bx1xD = decoder.forward(params, tokens_B[:, None], cfg=mc, positions_BxT=positions_B[:, None],
                                                 cache=cache, meta=meta, return_hidden=True)
        return pick(logits[:, 0], temp, top_p, seed, kv_lens), cache, h_Bx1xD[:, 0]

    def layer_hidden(params_l, cache, tokens_B, positions_B, page_table, kv_lens):
        _, _, h_Bx1xD = decoder.forward(params_l, tokens_B[:, None], cfg=mc, positions_BxT=positions_B[:, None],
                                        cache=cache, meta=AttentionMetadata(page_table, kv_lens), return_hidden=True)
        return h_Bx1xD[:, 0]

    def prefill(params, cache, tokens_1xT, positions_1xT, page_table, kv_lens, last_1, temp, top_p, seed):
        logits, cache = decoder.forward(params, tokens_1xT, cfg=mc, positions_BxT=positions_1xT, cache=cache,
                                        meta=AttentionMetadata(page_table, kv_lens), logits_index_B=last_1)
        return pick(logits[:, 0], temp, top_p, seed, kv_lens), cache

    def prompt_hidden(params, params_l, tokens_1xT, positions_1xT):
        valid = positions_1xT >= 0
        _, _, h_final = decoder.forward(params, tokens_1xT, cfg=mc, positions_BxT=positions_1xT, valid_BxT=valid,
                                        return_hidden=True)
        _, _, h_layer = decoder.forward(params_l, tokens_1xT, cfg=mc, positions_BxT=positions_1xT, valid_BxT=valid,
                                        return_hidden=True)
        return h_layer[0], h_final[0]

    return _StepFns(jax.jit(decode, donate_argnums=1), jax.jit(layer_hidden), jax.jit(prefill, donate_argnums=1),
                    jax.jit(prompt_hidden))


class _SlotDecoder:
    """`slots` requests decoded together; a finished request's slot is refilled by a one-request
    prefill. Slot b owns pages 1 + b * P ... (b + 1) * P of the cache (page 0 is scratch)."""

    def __init__(self, model, cfg: LengthDataConfig):
        from jaxsys.models.kv_cache import init_cache

        mc = model.config
        self.model = model
        self.layer = cfg.layer(mc.num_layers)
        self.B = cfg.slots
        self.P = -(-(cfg.max_prompt_tokens + cfg.max_new_tokens) // PAGE_SIZE)
        self.cache = init_cache(mc, 1 + self.B * self.P, PAGE_SIZE)
        self.page_table = (1 + np.arange(self.B * self.P, dtype=np.int32)).reshape(self.B, self.P)
        self.params_l = _through_layer(model.params, self.layer)
        fns = _step_fns(mc, cfg.top_k)
        self._decode, self._layer_hidden, self._prefill, self._prompt_hidden = fns

    def prompt_features(self, ids: Sequence[int]) -> dict[str, np.ndarray]:
        from jaxsys.shapes import pow2_bucket

        T = pow2_bucket(len(ids), minimum=16)
        tokens = np.zeros((1, T), np.int32)
        positions = np.full((1, T), -1, np.int32)
        tokens[0, :len(ids)] = ids
        positions[0, :len(ids)] = np.arange(len(ids))
        h_layer, h_final = self._prompt_hidden(self.model.params, self.params_l, tokens, positions)
        h_layer, h_final = np.asarray(h_layer)[:len(ids)], np.asarray(h_final)[:len(ids)]
        return {"layer_mean": h_layer.mean(0), "layer_last": h_layer[-1],
                "final_mean": h_final.mean(0), "final_last": h_final[-1]}

    def prefill(self, slot: int, ids: Sequence[int], sampling: tuple[float, float, int]) -> int:
        from jaxsys.shapes import pow2_bucket

        n = len(ids)
        T = pow2_bucket(n, minimum=16)
        tokens = np.zeros((1, T), np.int32)
        positions = np.full((1, T), -1, np.int32)
        tokens[0, :n] = ids
        positions[0, :n] = np.arange(n)
        pages = pow2_bucket(-(-n // PAGE_SIZE))
        temp, top_p, seed = sampling
        nxt, self.cache = self._prefill(self.model.params, self.cache, tokens, positions,
                                        self.page_table[slot:slot + 1, :pages], np.array([n], np.int32),
                                        np.array([n - 1], np.int32), np.array([temp], np.float32),
                                        np.array([top_p], np.float32),
                                        np.array([seed], np.int32))
        return int(np.asarray(nxt)[0])

    def step(self, tokens_B, positions_B, kv_lens_B, temp_B, top_p_B, seed_B, capture: bool):
        """One decode step for all slots (position -1 marks an idle slot). Returns the next tokens and,
        when `capture`, the (layer-l, final-norm) hidden states [B, D] of this step."""
        from jaxsys.shapes import pow2_bucket

        pages = pow2_bucket(-(-int(kv_lens_B.max()) // PAGE_SIZE))
        pt = self.page_table[:, :pages]
        args = (tokens_B, positions_B, pt, kv_lens_B)
        nxt, self.cache, h_final = self._decode(self.model.params, self.cache, *args, temp_B, top_p_B, seed_B)
        hidden = None
        if capture:
            h_layer = self._layer_hidden(self.params_l, self.cache, *args)
            hidden = (np.asarray(h_layer), np.asarray(h_final))
        return np.asarray(nxt), hidden


_OUTPUT_PROJECTIONS = ("wo", "w_down", "we_down", "ws_down")


def _through_layer(params: dict, layer: int) -> dict:
    """The same model with layers `layer`, `layer + 1`, ... made exact identities and a unit final
    norm gain: its `return_hidden` output is the residual stream after `layer` layers, RMS-normalised.

    A layer adds `attn(x) @ wo` and `mlp(x) @ w_down` to the residual; with both projections zero it
    adds exact zeros.
    """
    import jax.numpy as jnp

    layers = dict(params["layers"])
    for name in _OUTPUT_PROJECTIONS:
        if name in layers:
            layers[name] = layers[name].at[layer:].set(0)
    return {**params, "layers": layers, "final_norm": jnp.ones_like(params["final_norm"])}


@dataclasses.dataclass
class _Running:
    prompt_index: int
    seed_index: int
    prompt_len: int
    sampling: tuple[float, float, int]
    tokens: list[int]
    g: list[int] = dataclasses.field(default_factory=list)
    h_layer: list[np.ndarray] = dataclasses.field(default_factory=list)
    h_final: list[np.ndarray] = dataclasses.field(default_factory=list)


def _atomic_savez(path: Path, **arrays) -> None:
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def _gen_path(root: Path, prompt_index: int, seed_index: int) -> Path:
    return root / "gens" / f"{prompt_index:05d}_s{seed_index}.npz"


def generate_length_data(cfg: LengthDataConfig, *, out_dir: Path | None = None, model=None,
                         data_dir: Path | None = None, prompts: Sequence[Prompt] | None = None,
                         limit: int | None = None, progress: bool = True) -> Path:
    """Generate (or resume) the length data for `cfg`; returns the run folder.

    model: a `jaxsys.LoadedModel` (default: `jaxsys.load_model(cfg.model)`).
    prompts: the prompts to use (default: `load_prompts(cfg.prompts, seed=cfg.prompt_seed)`).
    limit: stop after this many new generations (the run stays resumable).
    Work is ordered seed-major (every prompt once, then every prompt again, ...), so a partial run
    already covers many prompts.
    """
    from tqdm import tqdm

    import jaxsys

    root = Path(out_dir) if out_dir is not None else length_data_dir() / cfg.run_name()
    (root / "gens").mkdir(parents=True, exist_ok=True)
    (root / "prompts").mkdir(exist_ok=True)
    if model is None:
        model = jaxsys.load_model(cfg.model)
    if prompts is None:
        prompts = load_prompts(cfg.prompts, data_dir=data_dir, seed=cfg.prompt_seed)
    tok = model.tokenizer
    if tok is None:
        raise ValueError(f"model {cfg.model!r} has no tokenizer; length data needs text prompts")
    ids = [tok.encode_chat([{"role": "user", "content": p.text}]) for p in prompts]
    skipped = [p.key for p, i in zip(prompts, ids) if len(i) > cfg.max_prompt_tokens]
    dec = _SlotDecoder(model, cfg)
    _write_manifest(root, cfg, model, prompts, ids, dec.layer, skipped)

    work = deque((pi, s) for s in range(cfg.seeds) for pi in range(len(prompts))
                 if len(ids[pi]) <= cfg.max_prompt_tokens and not _gen_path(root, pi, s).exists())
    total = sum(1 for s in range(cfg.seeds) for pi in range(len(prompts)) if len(ids[pi]) <= cfg.max_prompt_tokens)
    if limit is not None:
        work = deque(list(work)[:limit])
    bar = tqdm(total=total, initial=total - len(work) if limit is None else 0, disable=not progress,
               desc="length data", unit="gen", smoothing=0.05)
    eos = set(model.config.eos_token_ids)
    B = cfg.slots
    slots: list[_Running | None] = [None] * B
    nxt = np.zeros(B, np.int32)
    step, new_tokens, t0 = 0, 0, time.perf_counter()

    def finish(b: int, reason: str) -> None:
        r = slots[b]
        slots[b] = None
        feats = _prompt_features(root, dec, r.prompt_index, ids[r.prompt_index])
        D = model.config.hidden_size
        g = np.array([0] + r.g, np.int32)
        h_layer = np.stack([feats["layer_last"]] + r.h_layer).astype(np.float16)
        h_final = np.stack([feats["final_last"]] + r.h_final).astype(np.float16)
        assert h_layer.shape == h_final.shape == (len(g), D)
        _atomic_savez(_gen_path(root, r.prompt_index, r.seed_index), token_ids=np.array(r.tokens, np.int32),
                      finish_reason=np.array(reason), prompt_len=np.int32(r.prompt_len), g=g,
                      hidden_layer=h_layer, hidden_final=h_final, seed=np.int32(r.sampling[2]))
        bar.update(1)

    while work or any(s is not None for s in slots):
        for b in range(B):
            while slots[b] is None and work:
                pi, s = work.popleft()
                sampling = (cfg.temperature, cfg.top_p, _seed_of(pi, s))
                first = dec.prefill(b, ids[pi], sampling)
                slots[b] = _Running(pi, s, len(ids[pi]), sampling, [])
                if first in eos:
                    finish(b, "stop")
                else:
                    slots[b].tokens.append(first)
                    nxt[b] = first
                    if cfg.max_new_tokens == 1:
                        finish(b, "length")
        active = [b for b in range(B) if slots[b] is not None]
        if not active:
            break
        positions = np.full(B, -1, np.int32)
        kv_lens = np.zeros(B, np.int32)
        temp = np.zeros(B, np.float32)
        top_p = np.ones(B, np.float32)
        seeds = np.zeros(B, np.int32)
        for b in active:
            r = slots[b]
            positions[b] = r.prompt_len + len(r.tokens) - 1
            kv_lens[b] = positions[b] + 1
            temp[b], top_p[b], seeds[b] = r.sampling
        capture = step % cfg.capture_every == 0
        out, hidden = dec.step(nxt.copy(), positions, kv_lens, temp, top_p, seeds, capture)
        step += 1
        new_tokens += len(active)
        for b in active:
            r = slots[b]
            if hidden is not None:
                r.g.append(len(r.tokens))
                r.h_layer.append(hidden[0][b])
                r.h_final.append(hidden[1][b])
            t = int(out[b])
            if t in eos:
                finish(b, "stop")
                continue
            r.tokens.append(t)
            nxt[b] = t
            if len(r.tokens) >= cfg.max_new_tokens:
                finish(b, "length")
        bar.set_postfix(tok_s=f"{new_tokens / (time.perf_counter() - t0):.1f}", running=len(active), refresh=False)
    bar.close()
    return root


def _prompt_features(root: Path, dec: _SlotDecoder, prompt_index: int, ids: Sequence[int]) -> dict[str, np.ndarray]:
    path = root / "prompts" / f"{prompt_index:05d}.npz"
    if path.exists():
        with np.load(path) as f:
            return {k: f[k].astype(np.float32) for k in f.files}
    feats = dec.prompt_features(ids)
    _atomic_savez(path, **{k: v.astype(np.float16) for k, v in feats.items()})
    return feats


def _write_manifest(root: Path, cfg: LengthDataConfig, model, prompts: Sequence[Prompt], ids, layer: int,
                    skipped: list[str]) -> None:
    manifest = {
        "config": cfg.model_dump(),
        "model": {"name": cfg.model, "num_layers": model.config.num_layers,
                  "hidden_size": model.config.hidden_size, "dtype": str(model.config.dtype)},
        "hidden_layer": layer,
        "provenance": ("hidden states from a batched jitted decode loop over "
                       "jaxsys.models.decoder.forward(return_hidden=True) with a paged KV cache "
                       "(serve/length/data.py): the same model math as the serving engine's decode step. "
                       "Sampling: top-k candidates, then jaxsys.sampling.sample (temperature, top-p, "
                       "per-request seed) among them. hidden_final: the final-norm hidden state "
                       "(the LM head's input). hidden_layer: the residual stream after layer "
                       f"{layer}, RMS-normalised without a gain. g: tokens generated before the step "
                       "(g = 0 is the last prompt position). remaining = len(token_ids) - g; EOS is "
                       "not counted; a generation cut at max_new_tokens has finish_reason 'length'."),
        "prompts": [{"key": p.key, "source": p.source, "tokens": len(i), "split": split_of(p.key)}
                    for p, i in zip(prompts, ids)],
        "skipped_long_prompts": skipped,
    }
    path = root / "manifest.json"
    if path.exists():
        old = json.loads(path.read_text())
        if old.get("config") != manifest["config"] or old.get("prompts") != manifest["prompts"]:
            raise ValueError(f"{root} holds data for another configuration or prompt list; "
                             "use another folder")
        return
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Loading


@dataclasses.dataclass
class LengthData:
    """The generations of a run, as arrays. One row per captured step ("samples"), one per
    generation ("gens"), one per prompt ("prompts").

    samples: gen [N] (index into gens), g [N] (tokens generated before the step), remaining [N],
             hidden_layer [N, D], hidden_final [N, D] (float32)
    gens:    gen_prompt [G] (index into prompts), gen_len [G], gen_truncated [G] (bool)
    prompts: prompt_source [P] (index into SOURCES), prompt_split [P] (index into SPLITS),
             prompt_len [P], prompt_features [P, 4 D] (layer mean, layer last, final mean, final last)
    """

    gen: np.ndarray
    g: np.ndarray
    remaining: np.ndarray
    hidden_layer: np.ndarray
    hidden_final: np.ndarray
    gen_prompt: np.ndarray
    gen_len: np.ndarray
    gen_truncated: np.ndarray
    prompt_keys: list[str]
    prompt_source: np.ndarray
    prompt_split: np.ndarray
    prompt_len: np.ndarray
    prompt_features: np.ndarray
    max_new_tokens: int
    hidden_layer_index: int
    manifest: dict

    @property
    def num_gens(self) -> int:
        return len(self.gen_len)

    def sample_split(self) -> np.ndarray:
        """Split index (into SPLITS) of every sample."""
        return self.prompt_split[self.gen_prompt[self.gen]]

    def sample_source(self) -> np.ndarray:
        return self.prompt_source[self.gen_prompt[self.gen]]

    def summary(self) -> dict:
        out = {"generations": self.num_gens, "samples": int(len(self.g)),
               "prompts": int(len(np.unique(self.gen_prompt))), "max_new_tokens": self.max_new_tokens,
               "hidden_layer": self.hidden_layer_index, "truncated_fraction": float(self.gen_truncated.mean())
               if self.num_gens else 0.0}
        for si, s in enumerate(SOURCES):
            lens = self.gen_len[self.prompt_source[self.gen_prompt] == si]
            if len(lens):
                out[f"len_{s}"] = {"n": int(len(lens)), "mean": float(lens.mean()),
                                   "median": float(np.median(lens)), "p90": float(np.percentile(lens, 90))}
        for i, name in enumerate(SPLITS):
            out[f"gens_{name}"] = int((self.prompt_split[self.gen_prompt] == i).sum())
        return out


def load_length_data(run_dir: Path) -> LengthData:
    """Assemble a run folder's finished generations (an unfinished run loads what exists)."""
    run_dir = Path(run_dir)
    mpath = run_dir / "manifest.json"
    if not mpath.is_file():
        raise FileNotFoundError(f"{run_dir} has no manifest.json: not a length-data run folder "
                                "(generate one with `python -m jaxsys.serve.length.cli data`)")
    manifest = json.loads(mpath.read_text())
    plist = manifest["prompts"]
    files = sorted((run_dir / "gens").glob("*_s*.npz"))
    files = [f for f in files if not f.name.endswith(".tmp.npz")]
    if not files:
        raise ValueError(f"{run_dir} holds no finished generation yet")
    used = sorted({int(f.name.split("_")[0]) for f in files})
    remap = {pi: i for i, pi in enumerate(used)}
    feats = []
    for pi in used:
        with np.load(run_dir / "prompts" / f"{pi:05d}.npz") as f:
            feats.append(np.concatenate([f["layer_mean"], f["layer_last"], f["final_mean"], f["final_last"]]))
    cols: dict[str, list] = {k: [] for k in ("gen", "g", "remaining", "hidden_layer", "hidden_final")}
    gen_prompt, gen_len, gen_trunc = [], [], []
    for gi, f in enumerate(files):
        with np.load(f) as z:
            n = len(z["token_ids"])
            cols["gen"].append(np.full(len(z["g"]), gi, np.int32))
            cols["g"].append(z["g"])
            cols["remaining"].append(n - z["g"])
            cols["hidden_layer"].append(z["hidden_layer"])
            cols["hidden_final"].append(z["hidden_final"])
            gen_prompt.append(remap[int(f.name.split("_")[0])])
            gen_len.append(n)
            gen_trunc.append(str(z["finish_reason"]) == "length")
    return LengthData(
        gen=np.concatenate(cols["gen"]), g=np.concatenate(cols["g"]).astype(np.int32),
        remaining=np.concatenate(cols["remaining"]).astype(np.int32),
        hidden_layer=np.concatenate(cols["hidden_layer"]).astype(np.float32),
        hidden_final=np.concatenate(cols["hidden_final"]).astype(np.float32),
        gen_prompt=np.array(gen_prompt, np.int32), gen_len=np.array(gen_len, np.int32),
        gen_truncated=np.array(gen_trunc, bool),
        prompt_keys=[plist[pi]["key"] for pi in used],
        prompt_source=np.array([SOURCES.index(plist[pi]["source"]) for pi in used], np.int32),
        prompt_split=np.array([SPLITS.index(plist[pi]["split"]) for pi in used], np.int32),
        prompt_len=np.array([plist[pi]["tokens"] for pi in used], np.int32),
        prompt_features=np.stack(feats).astype(np.float32),
        max_new_tokens=int(manifest["config"]["max_new_tokens"]),
        hidden_layer_index=int(manifest["hidden_layer"]), manifest=manifest)


def latest_run(root: Path | None = None) -> Path:
    """The most recently modified run folder under `length_data_dir()` (or `root`)."""
    root = Path(root) if root is not None else length_data_dir()
    runs = [p for p in root.glob("*") if (p / "manifest.json").is_file()] if root.is_dir() else []
    if not runs:
        raise FileNotFoundError(f"no length data under {root}; generate it with "
                                "`python -m jaxsys.serve.length.cli data` (see --help)")
    return max(runs, key=lambda p: (p / "manifest.json").stat().st_mtime)

