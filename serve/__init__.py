"""Serving: the engine (device steps), the scheduler (host orchestration), the OpenAI server."""

from jaxsys._lazy import lazy_exports

_LAZY = {"EngineConfig": "jaxsys.serve.engine.engine", "ServingLLM": "jaxsys.serve.llm"}
__getattr__, __dir__, __all__ = lazy_exports("jaxsys.serve", _LAZY)
