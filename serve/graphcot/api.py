"""One-call entry points: load a graph by path or name, answer a list of questions."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence

from jaxsys.serve.graphcot.graph import Graph

GRAPH_NAMES = {"goodbooks": ("glm", "goodbooks-10k", "books.csv")}


def data_dir() -> Path:
    """Where the data that cannot be generated lives: $JAXSYS_DATA, else the checkout's ../shared/data."""
    env = os.environ.get("JAXSYS_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2].parent / "shared" / "data"


def load_graph(path_or_name: str | os.PathLike) -> Graph:
    """A graph from a name (`goodbooks`), a GRBench `graph.json` (or a folder holding one), or a
    goodbooks-format `books.csv`."""
    from jaxsys.serve.graphcot.goodbooks import build_goodbooks

    text = str(path_or_name)
    if text in GRAPH_NAMES:
        path = data_dir().joinpath(*GRAPH_NAMES[text])
        if not path.is_file():
            raise FileNotFoundError(f"the {text} graph needs {path} (set JAXSYS_DATA to the folder holding glm/)")
        return build_goodbooks(path)
    path = Path(text)
    if path.is_dir() and (path / "graph.json").is_file():
        return Graph.load(path / "graph.json", name=path.name)
    if path.suffix == ".csv":
        return build_goodbooks(path)
    if path.suffix == ".json" or path.is_file():
        return Graph.load(path)
    raise FileNotFoundError(f"no graph at {text!r}: give a name ({', '.join(GRAPH_NAMES)}), a graph.json (or a "
                            f"folder holding one) or a goodbooks books.csv")


def answer_questions(questions: Sequence[dict[str, Any]], graph: Graph, *, system: str = "glm",
                     model: Any = "smollm2-135m-instruct", backend_url: str | None = None, concurrency: int = 16,
                     sharing: bool = True, priority: bool = True, pipelining: bool = True, engine_config=None,
                     progress: bool = False, on_record: Callable | None = None, **config: Any) -> list:
    """Answer `questions` (GRBench dicts) with GLM or Graph-CoT; one `QuestionRecord` each.

    In process (default): `model` is a registry name, a path or a `LoadedModel`, served by our
    engine with the priority eviction policy (`priority=False`: LRU). With `backend_url`: any
    OpenAI-compatible server, e.g. `jaxsys serve`."""
    from jaxsys.serve.graphcot.backends import EngineBackend, OpenAIBackend
    from jaxsys.serve.graphcot.runner import GraphQA, RunConfig

    run_config = RunConfig(system=system, concurrency=concurrency, sharing=sharing, pipelining=pipelining, **config)
    policy = None
    if backend_url is not None:
        backend = OpenAIBackend(backend_url)
    else:
        from jaxsys.serve import EngineConfig, ServingLLM
        from jaxsys.serve.graphcot.cache_policy import VertexPriorityPolicy

        engine_config = engine_config or EngineConfig(max_decode_batch=max(16, concurrency))
        policy = VertexPriorityPolicy(engine_config.page_size) if priority else None
        backend = EngineBackend(ServingLLM(model, config=engine_config, eviction_policy=policy), policy=policy)
    try:
        with GraphQA(graph, backend, run_config, policy=policy) as qa:
            return qa.run(questions, progress=progress, on_record=on_record)
    finally:
        backend.close()
