"""MoE decoding with experts offloaded to host memory (SpecMoEOff, arXiv 2508.21706).

- `store`: expert weights in host memory (pinned_host where the backend has it), the per-layer
  device expert cache; `policy`: its replaceable eviction policies (LRU, LFU).
- `runner.OffloadedMoE`: the host-driven layer loop: route, fetch the missing experts, prefetch the
  next layer's likely experts, compute only the active ones; counters of bytes, hits, experts.
- `experts`: the routed-expert math shared with the all-on-device baseline (`sparse_moe_ffn`).
- `host_attention`: chunked, LSE-merged verification attention over a KV cache in host memory.
"""

from jaxsys._lazy import lazy_exports

_LAZY = {
    "OffloadConfig": "jaxsys.serve.moe_offload.runner", "OffloadedMoE": "jaxsys.serve.moe_offload.runner",
    "OffloadStats": "jaxsys.serve.moe_offload.runner",
    "ExpertCacheError": "jaxsys.serve.moe_offload.store", "HostExpertStore": "jaxsys.serve.moe_offload.store",
    "LayerExpertCache": "jaxsys.serve.moe_offload.store",
    "LRUPolicy": "jaxsys.serve.moe_offload.policy", "LFUPolicy": "jaxsys.serve.moe_offload.policy",
    "EvictionPolicy": "jaxsys.serve.moe_offload.policy",
    "sparse_moe_ffn": "jaxsys.serve.moe_offload.experts",
    "chunked_paged_attention": "jaxsys.serve.moe_offload.host_attention",
}
__getattr__, __dir__, __all__ = lazy_exports("jaxsys.serve.moe_offload", _LAZY)
