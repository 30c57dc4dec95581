"""Reference decode attention over a prefix tree: float32 jnp, one request at a time. The truth.

Each request's keys/values are gathered token by token from the paged cache following its
root-to-leaf path (or its page table), then ordinary softmax attention runs in float32.
No partials, no merging, no tiling: nothing here shares code with the fast paths.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from .balancer import PrefixTree

__all__ = ["shared_prefix_attention_reference", "paged_attention_reference"]


def _token_slots(page_lists: list[np.ndarray], page_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(page, slot, valid) i32/bool[B, Lmax] of every KV token of every request (host side)."""
    lmax = max([len(p) for p in page_lists] + [1])
    page = np.zeros((len(page_lists), lmax), np.int32)
    slot = np.zeros((len(page_lists), lmax), np.int32)
    valid = np.zeros((len(page_lists), lmax), bool)
    for b, tokens in enumerate(page_lists):
        n = len(tokens)
        if n:
            page[b, :n] = tokens[:, 0]
            slot[b, :n] = tokens[:, 1]
            valid[b, :n] = True
    return page, slot, valid


def _attend(q, k_pages, v_pages, page, slot, valid, sm_scale):
    """q: [B, Hq, D]; pages: [Hkv, NP, ps, D]; page/slot/valid: [B, L] -> f32[B, Hq, D]."""
    b, hq, d = q.shape
    hkv = k_pages.shape[0]
    g = hq // hkv
    k = k_pages[:, page, slot].astype(jnp.float32)  # [Hkv, B, L, D]
    v = v_pages[:, page, slot].astype(jnp.float32)
    q_bhgd = q.astype(jnp.float32).reshape(b, hkv, g, d)
    logits = jnp.einsum("bhgd,hbld->bhgl", q_bhgd, k, precision=jax.lax.Precision.HIGHEST) * sm_scale
    logits = jnp.where(valid[:, None, None, :], logits, -jnp.inf)
    has_any = jnp.any(valid, axis=-1)[:, None, None, None]  # requests with no KV -> zeros
    weights = jax.nn.softmax(jnp.where(has_any, logits, 0.0), axis=-1)
    weights = jnp.where(has_any, weights, 0.0)
    out = jnp.einsum("bhgl,hbld->bhgd", weights, v, precision=jax.lax.Precision.HIGHEST)
    return out.reshape(b, hq, d)


def shared_prefix_attention_reference(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
                                      tree: PrefixTree, *, sm_scale: float | None = None) -> jax.Array:
    """Decode attention of each request over the concatenated KV of its root-to-leaf path.

    Args:
      q: [B, num_q_heads, head_dim] one query token per request (B = tree.num_requests; extra
        rows are padding and get zeros).
      k_pages: [num_kv_heads, total_num_pages, page_size, head_dim].
      v_pages: [num_kv_heads, total_num_pages, page_size, head_dim].
      tree: the `PrefixTree` (node pages, lengths, parents, each request's deepest node).
      sm_scale: softmax scale, default 1/sqrt(head_dim).

    Returns:
      f32[B, num_q_heads, head_dim]. Query head h attends KV head h // (num_q_heads / num_kv_heads).
    """
    b, hq, d = q.shape
    hkv, _, ps, _ = k_pages.shape
    if hq % hkv or ps != tree.page_size or b < tree.num_requests:
        raise ValueError(f"bad shapes: q {q.shape}, k_pages {k_pages.shape}, tree page_size "
                         f"{tree.page_size}, {tree.num_requests} requests")
    lists = []
    for r in range(b):
        toks = []
        if r < tree.num_requests:
            for n in tree.path(r):
                for p, fill in zip(tree.node_pages[n], tree.node_page_lens(n)):
                    toks.extend((int(p), s) for s in range(int(fill)))
        lists.append(np.array(toks, np.int32).reshape(-1, 2))
    page, slot, valid = _token_slots(lists, ps)
    scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
    return _attend(q, k_pages, v_pages, page, slot, valid, scale)


def paged_attention_reference(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
                              page_indices, lengths, *, sm_scale: float | None = None) -> jax.Array:
    """Plain paged decode attention (no tree): request b reads `lengths[b]` tokens of its pages.

    Args:
      q: [B, num_q_heads, head_dim].
      k_pages, v_pages: [num_kv_heads, total_num_pages, page_size, head_dim].
      page_indices: i32[B, pages_per_sequence] physical pages of each request, in order.
      lengths: i32[B] tokens of each request.
      sm_scale: softmax scale, default 1/sqrt(head_dim).

    Returns:
      f32[B, num_q_heads, head_dim].
    """
    page_indices = np.asarray(page_indices)
    lengths = np.asarray(lengths)
    ps = k_pages.shape[2]
    lists = []
    for b in range(q.shape[0]):
        t = np.arange(int(lengths[b]))
        lists.append(np.stack([page_indices[b, t // ps], t % ps], axis=-1).astype(np.int32))
    page, slot, valid = _token_slots(lists, ps)
    scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else sm_scale
    return _attend(q, k_pages, v_pages, page, slot, valid, scale)
