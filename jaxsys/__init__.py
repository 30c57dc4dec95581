"""jaxsys: one JAX/XLA stack for fast, resilient LLM serving, LLM training and graph learning.

The top-level namespace is deliberately light: `import jaxsys` (and `jaxsys --help`) does not
import jax. Public entry points load on first use:

    import jaxsys
    model = jaxsys.load_model("smollm2-135m-instruct")
    print(jaxsys.generate(model, ["The capital of France is"], max_tokens=8)[0].text)
"""

from __future__ import annotations

from jaxsys._lazy import lazy_exports

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "generate": "jaxsys.generation",
    "GenerationResult": "jaxsys.generation",
    "SamplingParams": "jaxsys.sampling",
    "load_model": "jaxsys.models",
    "LoadedModel": "jaxsys.models",
    "ModelConfig": "jaxsys.models",
    "make_mesh": "jaxsys.sharding",
}

__getattr__, __dir__, _public = lazy_exports("jaxsys", _LAZY)
__all__ = _public + ["__version__"]
