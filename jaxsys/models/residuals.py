"""Names of the decoder's candidate activations for the backward pass, one vocabulary per layer kind.

The decoder tags each candidate with `jax.ad_checkpoint.checkpoint_name(x, NAME)`. A tag is the
identity and changes nothing by itself; it lets a `jax.checkpoint` policy address the value: keep it
on device for the backward pass, recompute it there, or offload it to host memory
(`jax.checkpoint_policies.save_and_offload_only_these_names`). The memory planner
(`jaxsys.train.memory`) chooses one of the three per name.

Layers run under one `lax.scan`, so a name covers that activation in every layer of the stack: a
policy addresses `attn_q` of all layers at once. Values that carry no name (softmax probabilities,
the normalisation statistics, the activation's sigmoid) are never saved under a names policy; the
backward pass recomputes them from the named ones.

The shapes in the comments below are per layer (B batch, T tokens, D hidden, Hq/Hkv heads, Dh head
dim, F MLP width, E experts, Fe expert width).
"""

from __future__ import annotations

# attention block (every layer kind)
ATTN_NORM = "attn_norm"    # [B, T, D]      rms_norm of the layer input
ATTN_Q = "attn_q"          # [B, T, Hq, Dh] queries after RoPE
ATTN_K = "attn_k"          # [B, T, Hkv, Dh] keys after RoPE
ATTN_V = "attn_v"          # [B, T, Hkv, Dh] values
ATTN_CTX = "attn_ctx"      # [B, T, Hq, Dh] attention output, before the output projection
ATTN_RESID = "attn_resid"  # [B, T, D]      residual stream after the attention block

# dense feed-forward (SwiGLU)
MLP_NORM = "mlp_norm"      # [B, T, D]      rms_norm of the residual stream
MLP_GATE = "mlp_gate"      # [B, T, F]      gate projection, before SiLU
MLP_UP = "mlp_up"          # [B, T, F]      up projection
MLP_ACT = "mlp_act"        # [B, T, F]      silu(gate) * up, the input of the down projection

# mixture of experts (every expert on every token, top-k combine)
MOE_ROUTER = "moe_router"  # [B, T, E]      router logits (float32)
MOE_GATE = "moe_gate"      # [B, T, E, Fe]  expert gate projections
MOE_UP = "moe_up"          # [B, T, E, Fe]  expert up projections
MOE_ACT = "moe_act"        # [B, T, E, Fe]  silu(gate) * up
MOE_EXPERT_OUT = "moe_expert_out"  # [B, T, E, D] each expert's output, before the combine

LAYER_KINDS: dict[str, tuple[str, ...]] = {
    "attention": (ATTN_NORM, ATTN_Q, ATTN_K, ATTN_V, ATTN_CTX, ATTN_RESID),
    "mlp": (MLP_NORM, MLP_GATE, MLP_UP, MLP_ACT),
    "moe": (MLP_NORM, MOE_ROUTER, MOE_GATE, MOE_UP, MOE_ACT, MOE_EXPERT_OUT),
}
"""Layer kind -> the names its layers tag (`mlp_norm` is shared by the two feed-forward kinds)."""

ALL_NAMES: frozenset[str] = frozenset(n for names in LAYER_KINDS.values() for n in names)


def layer_kind(name: str) -> str:
    """The layer kind a residual name belongs to (the first listed, for `mlp_norm`); `other` for a
    name the decoder does not define (a user's own tag)."""
    for kind, names in LAYER_KINDS.items():
        if name in names:
            return kind
    return "other"
