"""The two question-answering protocols as pure state machines, and their robust parsers.

A protocol is a generator: it yields what it needs done and receives the outcome:

    LLMCall(agent, segments, max_tokens, stop, notes)  ->  the completion text
    GraphCall(function, args)                          ->  GraphOutcome(value | error)
    Exec(code)                                         ->  sandbox.ExecResult

and returns a `ProtocolOutcome` (the answer, how many outputs could not be parsed, steps). The
runner (`runner.py`) performs the effects: on the serving engine or an HTTP backend, in many
threads at once, or with the oracle's answers instead of a model's. The protocols themselves never
block, so the same code is the system, the baseline and the trace writer.

Parsing never raises: a 135M model writes broken actions, unknown labels and prose instead of
code. Every such output is counted in `parse_failures` and answered the way the protocol's own
rules say (Graph-CoT's fixed error observations; GLM falls back to the question itself).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Generator

from jaxsys.serve.graphcot import prompts
from jaxsys.serve.graphcot.prompts import NotebookEntry, Segment


@dataclasses.dataclass
class LLMCall:
    agent: str  # "graphcot-thought", "graphcot-action", "c", "r", "a"
    segments: list[Segment]
    max_tokens: int
    stop: tuple[str, ...] = ()
    notes: dict[str, Any] = dataclasses.field(default_factory=dict)  # protocol state, for the oracle


@dataclasses.dataclass
class GraphCall:
    function: str
    args: tuple[str, ...]


@dataclasses.dataclass
class GraphOutcome:
    value: Any = None
    error: str | None = None


@dataclasses.dataclass
class Exec:
    code: str


@dataclasses.dataclass
class ProtocolOutcome:
    answer: str
    parse_failures: int
    steps: int
    finished: bool  # False when the step limit (or the context) ran out first


Protocol = Generator[Any, Any, ProtocolOutcome]


# ------------------------------------------------------------------------------ Graph-CoT

_ACTION = re.compile(r"^(\w+)\[(.+)\]$", re.S)
_CHECKS = re.compile(r"\w+\[.*?\]")
_STEP_PREFIX = re.compile(r"^\s*(thought|action|observation)\s*\d*\s*:\s*", re.I)


def format_step(text: str) -> str:
    """One step's text: the first non-empty line, without a repeated "Action 3:" style prefix
    (Graph-CoT strips newlines; a small model often echoes the label)."""
    for line in str(text).splitlines():
        line = _STEP_PREFIX.sub("", line.strip()).strip()
        if line:
            return line
    return ""


def get_action_list(action: str) -> list[str]:
    """Graph-CoT's: a Finish step whole, otherwise every `Name[...]` in the line."""
    if action.startswith("Finish"):
        return [action]
    return _CHECKS.findall(action)


def parse_action(text: str) -> tuple[str, str] | None:
    m = _ACTION.match(text.strip())
    return (m.group(1), m.group(2)) if m else None


def _remove_quotes(s: str) -> str:
    s = s.strip()
    if len(s) >= 2 and s[0] in "'\"" and s[-1] in "'\"":
        return s[1:-1]
    return s


def _two_args(argument: str) -> tuple[str, str] | None:
    parts = argument.split(", ")
    if len(parts) != 2:
        parts = argument.split(",")
        if len(parts) != 2:
            return None
    return _remove_quotes(parts[0]), _remove_quotes(parts[1])


def graphcot_protocol(question: str, graph_definition: str, *, max_steps: int = 10,
                      max_tokens: int = 300) -> Protocol:
    """Graph-CoT's agent loop (`GraphAgent.step`): a Thought call and an Action call per step, both
    stopped at a newline, observations appended to the scratchpad, at most `max_steps` steps."""
    scratchpad = ""
    failures = 0

    def call(agent: str, n: int) -> LLMCall:
        return LLMCall(agent, prompts.graphcot_prompt(question, scratchpad, graph_definition), max_tokens, ("\n",),
                       {"step": n, "scratchpad": scratchpad})

    for n in range(1, max_steps + 1):
        scratchpad += f"\nThought {n}:"
        thought = format_step((yield call("graphcot-thought", n)))
        scratchpad += " " + thought
        scratchpad += f"\nAction {n}:"
        action = format_step((yield call("graphcot-action", n)))
        scratchpad += " " + action
        scratchpad += f"\nObservation {n}: "
        if not action:
            failures += 1
            scratchpad += ("You action is filtered due to content. Please assume all the actions are permitted in "
                           "this environment and take the action again.")
        actions = get_action_list(action)
        if action and not actions:
            failures += 1
            scratchpad += ("Invalid Action. Valid Actions are RetrieveNode[<Content>] NeighbourCheck[<Node>] "
                           "NodeFeature[<Node>] and Finish[<answer>].")
        for text in actions:
            parsed = parse_action(text)
            if parsed is None:
                failures += 1
                scratchpad += "There is something wrong with the generated target actions."
                continue
            kind, argument = parsed
            if kind == "Finish":
                return ProtocolOutcome(_remove_quotes(argument), failures, n, True)
            if kind == "RetrieveNode":
                out = yield GraphCall("RetrieveNode", (argument,))
                if out.error is None and out.value is not None:
                    scratchpad += f"The ID of this retrieval target node is {out.value}."
                else:
                    scratchpad += "There is no information that can be matched in the database. Please try another query."
            elif kind in ("NeighbourCheck", "NodeFeature", "NodeDegree"):
                args = _two_args(argument)
                if args is None:
                    failures += 1
                    what = {"NeighbourCheck": "neighbour checking", "NodeFeature": "node checking",
                            "NodeDegree": "degree checking"}[kind]
                    second = "feature name" if kind == "NodeFeature" else "neighbor type"
                    scratchpad += (f"There is something wrong with the arguments you send for {what}. Please modify it. "
                                   f"Make sure that {kind} take two value as input: node id and {second}.")
                    continue
                out = yield GraphCall(kind, args)
                if out.error is not None:
                    scratchpad += ("The node or feature name does not exist in the graph. This might because your given "
                                   "feature name is not correct. Please modify it." if kind == "NodeFeature" else
                                   "The node or neighbor type does not exist in the graph. This might because your "
                                   "given neighbor type is not correct. Please modify it.")
                elif kind == "NeighbourCheck":
                    scratchpad += f"The {args[1]} neighbors of {args[0]} are: {out.value}. "
                elif kind == "NodeFeature":
                    scratchpad += f"The {args[1]} feature of {args[0]} are: {out.value}. "
                else:
                    scratchpad += f"The {args[1]} neighbor node degree of {args[0]} are: {out.value}. "
            else:
                failures += 1
                scratchpad += ("Invalid Action. Valid Actions are RetrieveNode[<Content>] NeighbourCheck[<Node>] "
                               "NodeFeature[<Node>] and Finish[<answer>].")
    return ProtocolOutcome("", failures, max_steps, False)


# ------------------------------------------------------------------------------ GLM

_CLASS = re.compile(r"\b(non[\s-]?deterministic|deterministic)\b", re.I)
_REPLY = re.compile(r"\b(answer|missing)(?:\s+is)?\s*:\s*(.*)", re.I)
_FENCE = re.compile(r"```(?:python|py)?\s*\n(.*?)(?:```|$)", re.S)


def parse_classification(text: str) -> bool | None:
    """True for deterministic, False for non-deterministic, None when neither is named."""
    m = _CLASS.search(str(text))
    if m is None:
        return None
    return not m.group(1).lower().startswith("non")


def parse_reasoning(text: str) -> tuple[str, str] | None:
    """("answer", text) or ("missing", text) from the first line that says either; None otherwise."""
    for line in str(text).splitlines():
        m = _REPLY.search(line)
        if m:
            return m.group(1).lower(), m.group(2).strip()
    return None


def extract_code(text: str) -> str:
    """The first fenced block if there is one, else the text up to a line that is prose again."""
    text = str(text)
    m = _FENCE.search(text)
    if m:
        return m.group(1).strip("\n")
    return text.strip("\n")


def glm_protocol(question: str, graph_definition: str, render_vertex: Callable[[str], str], *, max_iters: int = 4,
                 sharing: bool = True, max_vertices: int = 8, c_tokens: int = 8, r_tokens: int = 64,
                 a_tokens: int = 192) -> Protocol:
    """GLM: the C-Agent classifies; a deterministic question goes straight to the A-Agent, otherwise
    the R-Agent names what is missing; the A-Agent writes code, the retriever runs it, the notebook
    records the output and the vertex facts of the nodes it touched; the R-Agent answers or asks
    again, at most `max_iters` rounds of code."""
    system = prompts.glm_system(graph_definition)
    failures = 0
    facts: dict[str, str] = {}
    notebook: list[NotebookEntry] = []

    def state() -> dict[str, Any]:
        return {"notebook": list(notebook), "facts": dict(facts)}

    label = parse_classification((yield LLMCall("c", prompts.c_prompt(system, question), c_tokens, ("\n",),
                                                state())))
    if label is None:
        failures += 1
    steps = 1
    need = question
    if not label:
        reply = yield LLMCall("r", prompts.r_prompt(system, question, facts, notebook, sharing=sharing), r_tokens,
                              ("\n",), state())
        steps += 1
        parsed = parse_reasoning(reply)
        if parsed is None:
            failures += 1
        elif parsed[0] == "answer" and parsed[1]:
            return ProtocolOutcome(parsed[1], failures, steps, True)
        elif parsed[1]:
            need = parsed[1]
    for _ in range(max_iters):
        text = yield LLMCall("a", prompts.a_prompt(system, question, need, facts, notebook, sharing=sharing),
                             a_tokens, (), dict(state(), need=need))
        result = yield Exec(extract_code(text))
        steps += 2
        if result.error is not None:
            failures += 1
        notebook.append(NotebookEntry(need, result.output, result.error))
        for v in result.touched:
            if len(facts) >= max_vertices:
                break
            facts.setdefault(v, render_vertex(v))
        reply = yield LLMCall("r", prompts.r_prompt(system, question, facts, notebook, sharing=sharing), r_tokens,
                              ("\n",), state())
        steps += 1
        parsed = parse_reasoning(reply)
        if parsed is None:
            failures += 1
            need = question
        elif parsed[0] == "answer" and parsed[1]:
            return ProtocolOutcome(parsed[1], failures, steps, True)
        else:
            need = parsed[1] or question
    return ProtocolOutcome("", failures, steps, False)


def drive(protocol: Protocol, on_llm: Callable[[LLMCall], str], on_graph: Callable[[GraphCall], GraphOutcome],
          on_exec: Callable[[Exec], Any]) -> ProtocolOutcome:
    """Run a protocol to the end on the calling thread with the given effect handlers."""
    try:
        request = next(protocol)
        while True:
            if isinstance(request, LLMCall):
                request = protocol.send(on_llm(request))
            elif isinstance(request, GraphCall):
                request = protocol.send(on_graph(request))
            elif isinstance(request, Exec):
                request = protocol.send(on_exec(request))
            else:
                raise TypeError(f"a protocol yielded {request!r}")
    except StopIteration as stop:
        return stop.value


def graph_handler(graph) -> Callable[[GraphCall], GraphOutcome]:
    from jaxsys.serve.graphcot.graph import GraphError

    fns = {"RetrieveNode": graph.retrieve_node, "NodeFeature": graph.node_feature, "NodeDegree": graph.node_degree,
           "NeighbourCheck": graph.neighbour_check}

    def handle(call: GraphCall) -> GraphOutcome:
        try:
            return GraphOutcome(fns[call.function](*call.args))
        except GraphError as e:
            return GraphOutcome(error=str(e))

    return handle
