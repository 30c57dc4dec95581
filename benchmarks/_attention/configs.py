"""What the attention benchmark runs, as data: the configurations (with their targets), the
trees the sweeps tune on, and the engine shapes the host plan is timed at.

Shapes: Hq=32, Hkv=8, head_dim=128, page_size=16 (the tuned tables' shape); P shared prefix, S
suffix, B requests. byte_ratio = sum_i(P + S_i) / (P + sum_i S_i): how much less KV sharing reads.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxsys.pallas_kernels.shapes import pow2_bucket
from jaxsys.pallas_kernels.shared_prefix_attention import PrefixTree

HQ, HKV, HEAD_DIM, PAGE = 32, 8, 128, 16
# --interpret: every tree 1/INTERPRET_SHRINK of its tokens (the interpreter checks the code path;
# its timings mean nothing)
INTERPRET_SHRINK = 64


@dataclasses.dataclass(frozen=True)
class Config:
    """One prefix tree. kind: "star" (P shared by B requests with S own tokens each), "binary"
    (a binary tree of `depth` levels below the root, `node_tokens` per node, a request per
    leaf) or "chains" (B unshared chains of depth + 1 nodes)."""

    name: str  # C1, C2, ...
    label: str
    kind: str
    B: int = 0
    P: int = 0
    S: int = 0
    depth: int = 0
    node_tokens: int = 1024
    vs_naive: float | None = None  # target; None: 0.5 * byte_ratio
    vs_splitkv: float | None = None  # target; None: no target

    def shrunk(self, factor: int) -> "Config":
        return dataclasses.replace(self, P=-(-self.P // factor), S=-(-self.S // factor),
                                   node_tokens=-(-self.node_tokens // factor))

    def params(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items()
                if k not in ("vs_naive", "vs_splitkv", "name", "label") and v}


CONFIGS = (
    Config("C1", "C1 B=32 P=8192 S=128", "star", B=32, P=8192, S=128, vs_naive=5.0, vs_splitkv=1.5),
    Config("C2", "C2 B=8 P=16384 S=512", "star", B=8, P=16384, S=512, vs_splitkv=1.5),
    Config("C2", "C2 B=8 P=16384 S=2048", "star", B=8, P=16384, S=2048),
    Config("C2", "C2 B=8 P=16384 S=8192", "star", B=8, P=16384, S=8192),
    Config("C3", "C3 B=4 P=S=2048", "star", B=4, P=2048, S=2048, vs_splitkv=0.9),
    Config("C3", "C3 B=16 P=S=2048", "star", B=16, P=2048, S=2048),
    Config("C3", "C3 B=64 P=S=2048", "star", B=64, P=2048, S=2048),
    Config("C4", "C4 binary depth 2", "binary", depth=2),
    Config("C4", "C4 binary depth 4", "binary", depth=4),
    Config("C4", "C4 binary depth 6", "binary", depth=6),
    Config("C4", "C4 chain (16 x 7 nodes, no sharing)", "chains", B=16, depth=6, vs_splitkv=0.9),
    Config("C5", "C5 B=16 P=16384 S=512", "star", B=16, P=16384, S=512, vs_naive=5.0, vs_splitkv=1.5),
)

# --quick: the same kinds of tree, 1/8 of the tokens
QUICK_CONFIGS = (
    Config("C1", "C1 B=8 P=1024 S=16", "star", B=8, P=1024, S=16, vs_naive=5.0, vs_splitkv=1.5),
    Config("C3", "C3 B=4 P=S=256", "star", B=4, P=256, S=256, vs_splitkv=0.9),
    Config("C4", "C4 binary depth 2", "binary", depth=2, node_tokens=128),
    Config("C4", "C4 chain", "chains", B=4, depth=2, node_tokens=128, vs_splitkv=0.9),
)


@dataclasses.dataclass(frozen=True)
class TuningTree:
    """A tree a sweep times, and whether the step shares every sharable node or none."""

    config: Config
    share: bool


# The trees the block-size sweeps time (by name, in `sweeps.py`); ours and the baselines alike.
TUNING_TREES = {
    "plain": TuningTree(Config("tune", "plain B=8 L=8192", "chains", B=8, depth=0, node_tokens=8192), share=False),
    "plain_small": TuningTree(Config("tune", "plain B=4 L=4096", "chains", B=4, depth=0, node_tokens=4096),
                              share=False),
    "star": TuningTree(Config("tune", "star B=32 P=8192 S=128", "star", B=32, P=8192, S=128), share=True),
    "star_small": TuningTree(Config("tune", "star B=8 P=4096 S=512", "star", B=8, P=4096, S=512), share=True),
    "star_few": TuningTree(Config("tune", "star B=8 P=8192 S=512", "star", B=8, P=8192, S=512), share=True),
    "star_short": TuningTree(Config("tune", "star B=16 P=2048 S=512", "star", B=16, P=2048, S=512), share=True),
    "binary4": TuningTree(Config("tune", "binary depth 4", "binary", depth=4), share=True),
}


@dataclasses.dataclass(frozen=True)
class EngineShape:
    """A serving decode step: `requests` requests below one shared prompt, each with tokens of its
    own; the model's attention heads and layers. The defaults are a 1,000-token prompt in 16-token
    pages: 62 full pages shared (a radix cache shares whole pages), and per request the prompt's
    last 8 tokens and 72 decoded ones (5 pages)."""

    label: str
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    layers: int
    requests: int = 64
    prefix: int = 992
    own: int = 80


# The host plan is timed at these (SmolLM2-135M's attention, and a 1.2B-parameter Llama's).
ENGINE_SHAPES = (
    EngineShape("SmolLM2-135M (Hq=9, Hkv=3, D=64, 30 layers)", 9, 3, 64, 30),
    EngineShape("Llama 1.2B (Hq=16, Hkv=4, D=128, 24 layers)", 16, 4, 128, 24),
)


def build_tree(cfg: Config, rng, page_size: int = PAGE) -> tuple[PrefixTree, int]:
    """(PrefixTree, total pages). Pages are a random permutation of the pool (a used cache)."""
    parent, lens, requests = [], [], []
    if cfg.kind == "star":
        parent.append(-1)
        lens.append(cfg.P)
        for _ in range(cfg.B):
            parent.append(0)
            lens.append(cfg.S)
            requests.append(len(parent) - 1)
    elif cfg.kind == "binary":
        parent.append(-1)
        lens.append(cfg.node_tokens)
        frontier = [0]
        for _ in range(cfg.depth):
            nxt = []
            for p in frontier:
                for _ in range(2):
                    parent.append(p)
                    lens.append(cfg.node_tokens)
                    nxt.append(len(parent) - 1)
            frontier = nxt
        requests = frontier
    elif cfg.kind == "chains":
        for _ in range(cfg.B):
            prev = -1
            for _ in range(cfg.depth + 1):
                parent.append(prev)
                lens.append(cfg.node_tokens)
                prev = len(parent) - 1
            requests.append(prev)
    else:
        raise ValueError(f"unknown tree kind {cfg.kind!r}")
    n_pages = [-(-n // page_size) for n in lens]
    pool = rng.permutation(sum(n_pages)).astype(np.int32)
    off = np.cumsum([0] + n_pages)
    tree = PrefixTree(page_size=page_size, node_parent=np.array(parent),
                      node_pages=tuple(pool[off[i]:off[i + 1]] for i in range(len(lens))),
                      node_lens=np.array(lens), request_nodes=np.array(requests))
    return tree, int(pool.shape[0])


def engine_tree(shape: EngineShape, page_size: int = PAGE, shrink: int = 1) -> tuple[PrefixTree, int]:
    """The decode step's tree as the scheduler builds it: the shared pages, and each request's own."""
    cfg = Config("engine", shape.label, "star", B=shape.requests, P=shape.prefix, S=shape.own)
    return build_tree(cfg.shrunk(shrink) if shrink > 1 else cfg, np.random.default_rng(0), page_size)


def byte_ratio(tree: PrefixTree) -> float:
    used = {n for r in range(tree.num_requests) for n in tree.path(r)}
    return float(tree.request_lengths().sum()) / float(sum(int(tree.node_lens[n]) for n in used))


def page_tables(tree: PrefixTree, num_rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Classic per-request page tables (the nodes here are page aligned) and lengths (i32),
    with `num_rows` rows (default: one per request; padding rows have no pages, length 0)."""
    tables = [np.concatenate([tree.node_pages[n] for n in tree.path(r)]) for r in range(tree.num_requests)]
    rows = len(tables) if num_rows is None else num_rows
    out = np.zeros((rows, pow2_bucket(max(t.shape[0] for t in tables))), np.int32)
    for r, t in enumerate(tables):
        out[r, :t.shape[0]] = t
    lengths = np.zeros((rows,), np.int32)
    lengths[:len(tables)] = tree.request_lengths()
    return out, lengths
