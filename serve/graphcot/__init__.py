"""GLM (multi-agent Graph Chain-of-Thought) and the single-agent Graph-CoT baseline, on our engine.

Graph-CoT (Jin et al., 2024) answers questions about a graph with one agent that loops Thought ->
Action -> Observation over four graph functions and re-sends its whole history every step. GLM
(arXiv 2511.01633) splits the work: a C-Agent classifies the question, an R-Agent reasons over a
notebook of facts and names what is missing, an A-Agent writes a Python snippet that combines the
graph functions, and a sandboxed retriever runs it. On the serving side: prompts laid out so graph
vertices are stable prefix segments the radix cache shares across agents and questions, a
priority eviction policy, and many questions in flight so tool work overlaps decoding.

    from jaxsys.serve.graphcot import load_graph, generate_questions, answer_questions
    graph = load_graph("goodbooks")                      # or a GRBench graph.json
    questions = generate_questions(graph, per_template=10, seed=0)
    records = answer_questions(questions[:8], graph, system="glm", concurrency=8)

Modules: `graph` (schema, loader, graph functions), `goodbooks` (the goodbooks-10k builder),
`questions` (GRBench-template generator, JSON lines), `prompts` and `protocols` (both systems as
state machines), `sandbox` (RestrictedPython in worker processes), `backends` (engine in process,
OpenAI-compatible HTTP), `cache_policy` (priority eviction), `runner` (concurrency, pipelining),
`oracle` (perfect play and training traces), `sft` (the traces as masked token rows for fine-tuning;
`jaxsys bench graphcot_finetune` trains on them), `metrics` (exact match, Rouge-L), `demo` (the
`make demo` section).
"""

from jaxsys._lazy import lazy_exports

_LAZY = {
    "Graph": "jaxsys.serve.graphcot.graph",
    "GraphError": "jaxsys.serve.graphcot.graph",
    "GraphSchemaError": "jaxsys.serve.graphcot.graph",
    "UnknownNodeError": "jaxsys.serve.graphcot.graph",
    "UnknownFeatureError": "jaxsys.serve.graphcot.graph",
    "UnknownNeighborTypeError": "jaxsys.serve.graphcot.graph",
    "render_vertex": "jaxsys.serve.graphcot.graph",
    "build_goodbooks": "jaxsys.serve.graphcot.goodbooks",
    "generate_questions": "jaxsys.serve.graphcot.questions",
    "load_questions": "jaxsys.serve.graphcot.questions",
    "write_questions": "jaxsys.serve.graphcot.questions",
    "QuestionFileError": "jaxsys.serve.graphcot.questions",
    "TEMPLATES": "jaxsys.serve.graphcot.questions",
    "Sandbox": "jaxsys.serve.graphcot.sandbox",
    "EngineBackend": "jaxsys.serve.graphcot.backends",
    "OpenAIBackend": "jaxsys.serve.graphcot.backends",
    "BackendError": "jaxsys.serve.graphcot.backends",
    "BackendUnreachable": "jaxsys.serve.graphcot.backends",
    "VertexPriorityPolicy": "jaxsys.serve.graphcot.cache_policy",
    "GraphQA": "jaxsys.serve.graphcot.runner",
    "RunConfig": "jaxsys.serve.graphcot.runner",
    "QuestionRecord": "jaxsys.serve.graphcot.runner",
    "summarize": "jaxsys.serve.graphcot.runner",
    "Oracle": "jaxsys.serve.graphcot.oracle",
    "run_oracle": "jaxsys.serve.graphcot.oracle",
    "write_traces": "jaxsys.serve.graphcot.oracle",
    "exact_match": "jaxsys.serve.graphcot.metrics",
    "rouge_l": "jaxsys.serve.graphcot.metrics",
    "load_graph": "jaxsys.serve.graphcot.api",
    "answer_questions": "jaxsys.serve.graphcot.api",
}
__getattr__, __dir__, __all__ = lazy_exports("jaxsys.serve.graphcot", _LAZY)
