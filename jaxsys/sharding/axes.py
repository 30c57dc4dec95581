"""Logical axis names. Layers name tensor dimensions with these; only `rules.py` maps them onto mesh
axes. Activation names and parameter names share one vocabulary."""

# activations
BATCH = "batch"
SEQ = "seq"
# parameters (and the activations that carry the same dimension)
VOCAB = "vocab"
EMBED = "embed"
Q_HEADS = "q_heads"
KV_HEADS = "kv_heads"
HEAD_DIM = "head_dim"
MLP = "mlp"
LAYERS = "layers"
NORM = "norm"
EXPERT = "expert"
EXPERT_MLP = "expert_mlp"
ROUTER = "router"  # the experts dimension of the router matrix (small; replicated)
# KV cache
CACHE_PAGES = "cache_pages"
PAGE = "page"
# elastic training: the parameters and optimizer moments as one flat vector, fully sharded
FLAT = "flat"

MESH_AXES = ("data", "fsdp", "tensor", "expert")
