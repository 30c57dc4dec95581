"""Serving: the engine (device steps), the scheduler (host orchestration), the OpenAI server."""

import importlib

_LAZY = {"EngineConfig": "jaxsys.serve.engine.engine", "ServingLLM": "jaxsys.serve.llm",
         "Completion": "jaxsys.serve.llm"}
__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'jaxsys.serve' has no attribute {name!r}")
