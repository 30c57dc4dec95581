"""MoEfication: turn a dense SwiGLU model (SmolLM2-135M-Instruct) into an MoE with real routing.

Method (after Zhang et al. 2022, "MoEfication: Transformer Feed-forward Layers are Mixtures of
Experts", Findings of ACL; its parameter/co-activation clustering split and its trained routers):

1. Run the dense model on real text (`../shared/data/prompts/`) and keep each layer's FFN input h.
2. Per layer, score each FFN neuron i by its mean contribution |silu(h g_i) (h u_i)| * ||d_i||. The
   top `shared_fraction` of neurons form an always-on shared expert (SmolLM2's SwiGLU activations
   are dense: without it, even an oracle router that keeps the best 25% of neurons per token gives
   perplexity > 2000 on held-out text).
3. The remaining neurons are split into E equal experts by balanced k-means on their co-activation
   profiles (each neuron's normalized |activation| over the training tokens): neurons that fire
   together share an expert, MoEfication's best split.
4. A linear router per layer (the Qwen2-MoE / Mixtral router shape) is trained with optax (Adam,
   binary cross-entropy) to predict which experts an oracle would pick: the top-k experts by the
   norm of their output contribution. A small loop written here, not `jaxsys.train`: serving code
   never imports the trainer (DESIGN.md), and this is a per-layer linear probe on cached features.
5. The result is a standard `qwen2_moe` parameter tree that `decoder.forward` runs unchanged. A
   MoEfied FFN must output the *sum* of the picked experts, while Qwen2-MoE weights them by the
   renormalized router softmax (norm_topk_prob) and gates the shared expert by a sigmoid. So the
   router logits are scaled by a small tau (top-k choice is scale-invariant; the renormalized
   weights become 1/k up to O(tau)), each routed expert's down projection is multiplied by k, and
   the shared gate is sigmoid(0) = 1/2 with the shared down projection doubled.

Results (perplexity against the dense model, routing statistics) come from `evaluate` and are
cached with the weights under `~/.cache/jaxsys/moefied/`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxsys.models import layers
from jaxsys.models.config import ModelConfig, rope_inv_freq
from jaxsys.serve.moe_offload.experts import route
from jaxsys.serve.moe_offload.runner import attention_in, self_attention

ROUTER_TAU = 1e-4  # router logit scale: top-k unchanged, combine weights 1/k * (1 + O(tau))


@dataclasses.dataclass(frozen=True)
class MoEfyConfig:
    num_experts: int = 8
    top_k: int = 4
    shared_fraction: float = 0.5
    train_texts: int = 48
    max_len: int = 128
    kmeans_iters: int = 8
    router_steps: int = 300
    router_lr: float = 1e-2
    seed: int = 0

    def key(self) -> str:
        return "e{}k{}s{}_n{}x{}_r{}".format(self.num_experts, self.top_k, int(self.shared_fraction * 100),
                                             self.train_texts, self.max_len, self.router_steps)


def cache_dir() -> Path:
    root = os.environ.get("JAXSYS_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "jaxsys")
    return Path(root) / "moefied"


# ---------------------------------------------------------------------- text

def load_texts(data_dir: Path) -> tuple[list[str], list[str]]:
    """(train, held-out) texts: GSM8K question + worked answer (first 1000 train, the rest held
    out), and the MT-Bench questions held out (another distribution)."""
    rows = [json.loads(line) for line in open(data_dir / "prompts" / "gsm8k_test.jsonl")]
    gsm = [r["question"] + "\n" + r["answer"] for r in rows]
    mt = [" ".join(json.loads(line)["turns"]) for line in open(data_dir / "prompts" / "mt_bench_questions.jsonl")]
    return gsm[:1000], gsm[1000:] + mt


def batch_tokens(tokenizer, texts: list[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    ids = [tokenizer.encode(t)[:max_len] for t in texts]
    toks = np.zeros((len(ids), max_len), np.int32)
    valid = np.zeros((len(ids), max_len), bool)
    for i, s in enumerate(ids):
        toks[i, :len(s)] = s
        valid[i, :len(s)] = True
    return toks, valid


# ---------------------------------------------------------------------- the dense model's FFN inputs

@functools.partial(jax.jit, static_argnames="cfg")
def dense_ffn_inputs(params, tokens_BxT, valid_BxT, *, cfg: ModelConfig) -> jax.Array:
    """Each layer's FFN input (after mlp_norm) of a dense model: [L, B, T, D]."""
    B, T = tokens_BxT.shape
    pos = jnp.where(valid_BxT, jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32)[None], (B, T)), -1)
    inv = jnp.asarray(rope_inv_freq(cfg))

    def body(x, p):
        q, k, v = attention_in(x, p, pos, inv, cfg)
        x = x + jnp.einsum("BTHK,HKD->BTD", self_attention(q, k, v, pos, cfg), p["wo"])
        h = layers.rms_norm(x, p["mlp_norm"], cfg.rms_norm_eps)
        return x + layers.swiglu(h, p["w_gate"], p["w_up"], p["w_down"]), h

    _, hs = jax.lax.scan(body, params["embed"][tokens_BxT], params["layers"])
    return hs


# ---------------------------------------------------------------------- the split

def balanced_kmeans(X_NxF: np.ndarray, k: int, iters: int, seed: int) -> np.ndarray:
    """Cluster N points into k clusters of exactly N / k: each round assigns (point, cluster) pairs
    greedily in order of distance, skipping full clusters, then recomputes the centroids."""
    N = X_NxF.shape[0]
    if N % k:
        raise ValueError(f"{N} neurons do not split into {k} equal experts")
    cap = N // k
    rng = np.random.default_rng(seed)
    C = X_NxF[rng.choice(N, k, replace=False)]
    assign = np.zeros(N, np.int64)
    for _ in range(iters):
        d = ((X_NxF[:, None, :] - C[None]) ** 2).sum(-1)
        assign = -np.ones(N, np.int64)
        count = np.zeros(k, np.int64)
        for flat in np.argsort(d, axis=None):
            i, e = divmod(int(flat), k)
            if assign[i] < 0 and count[e] < cap:
                assign[i], count[e] = e, count[e] + 1
        C = np.stack([X_NxF[assign == e].mean(0) for e in range(k)])
    return assign


def split_layer(h_NxD: np.ndarray, w_gate_DxF: np.ndarray, w_up_DxF: np.ndarray, w_down_FxD: np.ndarray,
                mc: MoEfyConfig) -> tuple[np.ndarray, np.ndarray]:
    """(shared neuron ids [Fs], expert neuron ids [E, Fe]) of one layer."""
    act = np.asarray(jax.nn.silu(h_NxD @ w_gate_DxF) * (h_NxD @ w_up_DxF))  # [N, F]
    score = np.abs(act).mean(0) * np.linalg.norm(w_down_FxD, axis=1)
    F = w_gate_DxF.shape[1]
    Fs = int(round(F * mc.shared_fraction))
    order = np.argsort(-score, kind="stable")
    shared, rest = np.sort(order[:Fs]), order[Fs:]
    prof = np.abs(act[:, rest]).T
    prof = prof / np.maximum(np.linalg.norm(prof, axis=1, keepdims=True), 1e-12)
    assign = balanced_kmeans(prof, mc.num_experts, mc.kmeans_iters, mc.seed)
    experts = np.stack([np.sort(rest[assign == e]) for e in range(mc.num_experts)])
    return shared, experts


def oracle_labels(h_NxD, w_gate, w_up, w_down, experts_ExFe, k) -> np.ndarray:
    """[N, E] 1.0 where the expert is among the token's top-k by output-contribution norm."""
    g = jnp.asarray(w_gate)[:, experts_ExFe]  # [D, E, Fe]
    u = jnp.asarray(w_up)[:, experts_ExFe]
    d = jnp.asarray(w_down)[experts_ExFe]  # [E, Fe, D]
    a = jax.nn.silu(jnp.einsum("ND,DEF->NEF", h_NxD, g)) * jnp.einsum("ND,DEF->NEF", h_NxD, u)
    norm_NxE = jnp.linalg.norm(jnp.einsum("NEF,EFD->NED", a, d), axis=-1)
    _, top = jax.lax.top_k(norm_NxE, k)
    return np.asarray(jnp.sum(jax.nn.one_hot(top, experts_ExFe.shape[0]), axis=1))


def train_routers(h_LxNxD: np.ndarray, labels_LxNxE: np.ndarray, mc: MoEfyConfig) -> tuple[np.ndarray, list[float]]:
    """All layers' linear routers at once (vmapped): Adam on the binary cross-entropy of the oracle's
    picks; full batch. Returns (router [L, D, E], loss per step)."""
    L, N, D = h_LxNxD.shape
    E = labels_LxNxE.shape[-1]
    h = jnp.asarray(h_LxNxD, jnp.float32)
    y = jnp.asarray(labels_LxNxE, jnp.float32)
    w = jnp.zeros((L, D, E), jnp.float32)
    opt = optax.adam(mc.router_lr)
    state = opt.init(w)

    def loss_fn(w):
        logits = jnp.einsum("LND,LDE->LNE", h, w)
        return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, y))

    @jax.jit
    def step(w, state):
        loss, g = jax.value_and_grad(loss_fn)(w)
        upd, state = opt.update(g, state, w)
        return optax.apply_updates(w, upd), state, loss

    losses = []
    for _ in range(mc.router_steps):
        w, state, loss = step(w, state)
        losses.append(loss)
    return np.asarray(w), [float(x) for x in jax.device_get(losses)]


def build_moe(params: dict[str, Any], cfg: ModelConfig, shared_LxFs: np.ndarray, experts_LxExFe: np.ndarray,
              router_LxDxE: np.ndarray, mc: MoEfyConfig) -> tuple[dict[str, Any], ModelConfig]:
    """The qwen2_moe parameter tree and config whose forward is the MoEfied FFN (module docstring)."""
    lay = {k: np.asarray(v) for k, v in params["layers"].items()}
    g, u, d = lay.pop("w_gate"), lay.pop("w_up"), lay.pop("w_down")
    L = cfg.num_layers
    ar = np.arange(L)[:, None]
    k = mc.top_k
    new = dict(lay)
    new["ws_gate"] = g[ar, :, shared_LxFs].transpose(0, 2, 1)
    new["ws_up"] = u[ar, :, shared_LxFs].transpose(0, 2, 1)
    new["ws_down"] = 2.0 * d[ar, shared_LxFs]
    new["ws_router"] = np.zeros((L, cfg.hidden_size), np.float32)
    ar3 = np.arange(L)[:, None, None]
    new["we_gate"] = g[ar3, :, experts_LxExFe].transpose(0, 1, 3, 2)  # [L, E, D, Fe]
    new["we_up"] = u[ar3, :, experts_LxExFe].transpose(0, 1, 3, 2)
    new["we_down"] = k * d[ar3, experts_LxExFe]  # [L, E, Fe, D]
    new["router"] = ROUTER_TAU * router_LxDxE
    out = {key: v for key, v in params.items() if key != "layers"}
    out["layers"] = {key: jnp.asarray(v, jnp.float32) for key, v in new.items()}
    moe_cfg = cfg.replace(model_type="qwen2_moe", num_experts=mc.num_experts, num_experts_per_tok=k,
                          moe_intermediate_size=experts_LxExFe.shape[2],
                          shared_expert_intermediate_size=shared_LxFs.shape[1], norm_topk_prob=True)
    return out, moe_cfg


def moefy(params: dict[str, Any], cfg: ModelConfig, tokens_BxT: np.ndarray, valid_BxT: np.ndarray,
          mc: MoEfyConfig, log=print) -> tuple[dict[str, Any], ModelConfig, dict[str, Any]]:
    """Steps 1-5 of the module docstring; returns (MoE params, MoE config, training record)."""
    t0 = time.perf_counter()
    hs = np.asarray(dense_ffn_inputs(params, jnp.asarray(tokens_BxT), jnp.asarray(valid_BxT), cfg=cfg))
    h_LxNxD = hs[:, valid_BxT]
    log(f"moefy: FFN inputs of {h_LxNxD.shape[1]} tokens x {cfg.num_layers} layers in {time.perf_counter() - t0:.0f} s")
    shared, experts, labels = [], [], []
    lay = params["layers"]
    for i in range(cfg.num_layers):
        g, u, d = (np.asarray(lay[k][i]) for k in ("w_gate", "w_up", "w_down"))
        s, e = split_layer(h_LxNxD[i], g, u, d, mc)
        shared.append(s)
        experts.append(e)
        labels.append(oracle_labels(h_LxNxD[i], g, u, d, e, mc.top_k))
    log(f"moefy: split {cfg.num_layers} layers in {time.perf_counter() - t0:.0f} s")
    router, losses = train_routers(h_LxNxD, np.stack(labels), mc)
    pred = np.asarray(jax.lax.top_k(jnp.einsum("LND,LDE->LNE", h_LxNxD, router), mc.top_k)[1])
    hit = np.take_along_axis(np.stack(labels), pred, axis=-1).mean()
    log(f"moefy: routers trained in {time.perf_counter() - t0:.0f} s (loss {losses[0]:.3f} -> {losses[-1]:.3f}, "
        f"oracle recall {hit:.3f} on the training tokens)")
    moe_params, moe_cfg = build_moe(params, cfg, np.stack(shared), np.stack(experts), router, mc)
    record = {"train_tokens": int(h_LxNxD.shape[1]), "router_loss_first": losses[0], "router_loss_last": losses[-1],
              "train_oracle_recall": float(hit), "seconds": time.perf_counter() - t0}
    return moe_params, moe_cfg, record


# ---------------------------------------------------------------------- evaluation

@functools.partial(jax.jit, static_argnames="cfg")
def routing_trace(params, tokens_BxT, valid_BxT, *, cfg: ModelConfig) -> jax.Array:
    """Each layer's top-k experts per token of an MoE model (no cache): [L, B, T, k] int32."""
    from jaxsys.serve.moe_offload.experts import sparse_moe_ffn

    B, T = tokens_BxT.shape
    pos = jnp.where(valid_BxT, jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32)[None], (B, T)), -1)
    inv = jnp.asarray(rope_inv_freq(cfg))

    def body(x, p):
        q, k, v = attention_in(x, p, pos, inv, cfg)
        x = x + jnp.einsum("BTHK,HKD->BTD", self_attention(q, k, v, pos, cfg), p["wo"])
        h = layers.rms_norm(x, p["mlp_norm"], cfg.rms_norm_eps)
        top_i, _ = route(h.reshape(B * T, -1), p["router"], cfg)
        return x + sparse_moe_ffn(h, p, cfg), top_i.reshape(B, T, -1)

    _, tops = jax.lax.scan(body, params["embed"][tokens_BxT].astype(jnp.float32), params["layers"])
    return tops


def perplexity(logits_BxTxV: jax.Array, tokens_BxT: np.ndarray, valid_BxT: np.ndarray) -> float:
    lp = jax.nn.log_softmax(logits_BxTxV[:, :-1], axis=-1)
    nll = -np.take_along_axis(np.asarray(lp), tokens_BxT[:, 1:, None], axis=-1)[..., 0]
    m = valid_BxT[:, 1:] & valid_BxT[:, :-1]
    return float(np.exp(nll[m].mean()))


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = np.asarray(v)
    return out


def _unflatten(flat: dict[str, np.ndarray]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in flat.items():
        node = out
        *parents, leaf = k.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = jnp.asarray(v)
    return out


def load_or_build(data_dir: Path, mc: MoEfyConfig = MoEfyConfig(), log=print
                  ) -> tuple[dict[str, Any], ModelConfig, dict[str, Any], Any]:
    """The MoEfied SmolLM2 (params, config, training record, the dense LoadedModel), built once and
    cached under `cache_dir()` (a few minutes on 2 CPU cores)."""
    from jaxsys.models import load_model

    dense = load_model()
    folder = cache_dir() / mc.key()
    if (folder / "params.npz").exists():
        with np.load(folder / "params.npz") as z:
            params = _unflatten(dict(z))
        meta = json.loads((folder / "moefied.json").read_text())
        cfg = dense.config.replace(**meta["config_overrides"])
        return params, cfg, meta["record"], dense
    train, _ = load_texts(data_dir)
    toks, valid = batch_tokens(dense.tokenizer, train[:mc.train_texts], mc.max_len)
    params, cfg, record = moefy(dense.params, dense.config, toks, valid, mc, log)
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "params.npz", **_flatten(params))
    overrides = {k: getattr(cfg, k) for k in ("model_type", "num_experts", "num_experts_per_tok",
                                              "moe_intermediate_size", "shared_expert_intermediate_size",
                                              "norm_topk_prob")}
    (folder / "moefied.json").write_text(json.dumps({"config_overrides": overrides, "record": record,
                                                     "moefy_config": dataclasses.asdict(mc)}, indent=1))
    return params, cfg, record, dense


def evaluate(params, cfg: ModelConfig, dense, data_dir: Path, *, texts: int = 32, max_len: int = 128,
             log=print) -> dict[str, Any]:
    """Quality against the dense model and routing statistics on held-out text, and the drafts'
    per-token acceptance along it (teacher forcing: p from the MoE, q from the draft; no engine)."""
    from jaxsys.models import decoder
    from jaxsys.serve.moe_offload import routing_stats as rs
    from jaxsys.serve.speculative.drafts import early_exit_draft
    from jaxsys.serve.speculative.reference import acceptance_along

    _, held = load_texts(data_dir)
    pick = held[:texts // 2] + held[-(texts - texts // 2):]  # GSM8K and MT-Bench
    toks, valid = batch_tokens(dense.tokenizer, pick, max_len)
    fwd = jax.jit(decoder.forward, static_argnames=("cfg",))
    dense_logits = fwd(dense.params, jnp.asarray(toks), cfg=dense.config, valid_BxT=jnp.asarray(valid))[0]
    moe_logits = fwd(params, jnp.asarray(toks), cfg=cfg, valid_BxT=jnp.asarray(valid))[0]
    out: dict[str, Any] = {"heldout_tokens": int(valid.sum()),
                           "ppl_dense": perplexity(dense_logits, toks, valid),
                           "ppl_moefied": perplexity(moe_logits, toks, valid)}
    log(f"moefy: held-out perplexity dense {out['ppl_dense']:.2f}, MoEfied {out['ppl_moefied']:.2f}")
    top = np.asarray(routing_trace(params, jnp.asarray(toks), jnp.asarray(valid), cfg=cfg))
    E, k = cfg.num_experts, cfg.num_experts_per_tok
    out["routing"] = {
        "skew": rs.usage_skew(top, valid, E),
        "consecutive_overlap": rs.consecutive_overlap(top, valid),
        "consecutive_overlap_if_random": k / E,
        "unique_experts": rs.unique_experts(top, valid, [1, 2, 4, 8, 16, 32], [1, 2, 3, 4, 5, 6, 8]),
        "lru_hit_rate": rs.lru_hit_rate(top, valid, list(range(k, E + 1))),
    }
    acc = {}
    for n in (4, 8, 15):
        dp, dc = early_exit_draft(params, cfg, n)
        q = fwd(dp, jnp.asarray(toks), cfg=dc, valid_BxT=jnp.asarray(valid))[0]
        rates = jax.jit(acceptance_along, static_argnums=3)(moe_logits, q, jnp.asarray(valid), 1.0)
        acc[f"early_exit_{n}"] = {k: float(v) for k, v in rates.items()}
    out["acceptance_teacher_forced"] = acc
    log(f"moefy: routing {json.dumps(out['routing']['skew'])[:200]}; overlap "
        f"{out['routing']['consecutive_overlap']:.3f}; acceptance {acc}")
    return out


NGRAM_GAMMAS = (1, 2, 3, 4, 5, 6, 8)


def ngram_acceptance(params, cfg: ModelConfig, dense, data_dir: Path, *, prompts: int = 4, new_tokens: int = 32,
                     gamma: int = 3, gammas: tuple[int, ...] = NGRAM_GAMMAS) -> dict[str, Any]:
    """n-gram prompt lookup's acceptance on the MoEfied model: greedy speculative generation with the
    cache-free reference loop (not the engine) from held-out GSM8K questions, at every gamma of
    `gammas` (`by_gamma`) and, at the top level, at `gamma`.

    Tokens per step are measured per gamma because n-gram acceptances are not independent draws:
    lookup proposes nothing where no n-gram matches and whole runs where the text copies itself, so
    (1 - a^(g+1)) / (1 - a) with the mean acceptance a does not give them.
    """
    from jaxsys.models import decoder
    from jaxsys.serve.speculative.reference import Sampling, generate_speculative

    rows = [json.loads(line) for line in open(data_dir / "prompts" / "gsm8k_test.jsonl")][1000:1000 + prompts]
    ids = [dense.tokenizer.encode_chat([{"role": "user", "content": r["question"]}]) for r in rows]
    P = max(map(len, ids))
    prompt = np.zeros((len(ids), P), np.int32)
    for i, s in enumerate(ids):
        prompt[i, :len(s)] = s

    def target(tokens):
        return decoder.forward(params, tokens, cfg=cfg)[0]

    def run(g: int) -> dict[str, Any]:
        _, st = generate_speculative(jax.random.key(0), target, prompt, np.array([len(s) for s in ids], np.int32),
                                     new_tokens, g, Sampling.uniform(len(ids)))
        return {"acceptance": st.acceptance, "tokens_per_step": st.tokens_per_step, "proposed": st.proposed,
                "accepted": st.accepted}

    by_gamma = {g: run(g) for g in sorted(set(gammas) | {gamma})}
    return {"gamma": gamma, **by_gamma[gamma], "by_gamma": {str(g): r for g, r in by_gamma.items()}}


def model_record(cfg: ModelConfig) -> dict[str, Any]:
    """The MoEfied model's shapes, as the tuner reads them from the evaluation record."""
    from jaxsys.serve.moe_offload.tuner import ModelShape

    return {"num_experts": cfg.num_experts, "top_k": cfg.num_experts_per_tok,
            "shape": dataclasses.asdict(ModelShape.from_config(cfg))}


def main() -> None:
    """Build (or load) the MoEfied SmolLM2 and write its evaluation next to it."""
    data_dir = Path(__file__).resolve().parents[2].parent / "shared" / "data"
    data_dir = Path(os.environ.get("JAXSYS_SHARED_DATA", data_dir))
    mc = MoEfyConfig()
    params, cfg, record, dense = load_or_build(data_dir, mc)
    ev = evaluate(params, cfg, dense, data_dir)
    ev["ngram"] = ngram_acceptance(params, cfg, dense, data_dir)
    ev["training"] = record
    ev["model"] = model_record(cfg)
    path = cache_dir() / mc.key() / "evaluation.json"
    path.write_text(json.dumps(ev, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
