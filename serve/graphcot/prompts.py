"""Prompts of both systems, as ordered segments the serving side can cache.

A prompt is a list of `Segment`s: a role (system or user), its text and what it is (`kind`): the
system prompt, an agent's template, one vertex's facts, the question, or the question's private
state. The engine backend tokenizes segment by segment, so a segment's tokens never depend on what
follows it, and tells the eviction policy what each KV page holds.

GLM's layout with sharing on (the vertex-centric cache model):

    system prompt -> agent template -> vertex facts (sorted by id) -> question -> notebook

Every agent of every question starts with the same system prompt; every call of an agent shares
its template; questions that touch the same vertices share the facts lines (one vertex renders to
the same line every time, `graph.render_vertex`). With sharing off, the layout is the natural one
(template -> question -> notebook, vertex facts inside the notebook in the order they were found),
which shares only the system prompt and the template.

Graph-CoT's prompt follows the original (`Graph-CoT/code/graph_prompts.py` and `graph_fewshots.py`):
system "You are a helpful AI bot.", then one human message holding the instruction, worked
examples, the graph definition, the question and the growing scratchpad of Thought / Action /
Observation lines. The wording and the examples are ours, written for a book/author/series graph.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Sequence

Kind = Literal["system", "template", "vertex", "question", "private"]


@dataclasses.dataclass(frozen=True)
class Segment:
    role: Literal["system", "user"]
    text: str
    kind: Kind
    vertex: str | None = None


def messages(segments: Sequence[Segment]) -> list[dict[str, str]]:
    """Chat messages: one system message, one user message (the user segments joined)."""
    system = "".join(s.text for s in segments if s.role == "system")
    user = "".join(s.text for s in segments if s.role == "user")
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]


# ------------------------------------------------------------------------------ Graph-CoT

GRAPHCOT_SYSTEM = "You are a helpful AI bot."

GRAPHCOT_INSTRUCTION = """Solve a question answering task with interleaving Thought, Interaction with Graph, Feedback from Graph steps. In Thought step, you can think about what further information is needed, and In Interaction step, you can get feedback from graphs with four functions:
(1) RetrieveNode[keyword], which retrieves the related node from the graph according to the corresponding query.
(2) NodeFeature[Node, feature], which returns the detailed attribute information of Node regarding the given "feature" key.
(3) NodeDegree[Node, neighbor_type], which calculates the number of "neighbor_type" neighbors of the node Node in the graph.
(4) NeighbourCheck[Node, neighbor_type], which lists the "neighbor_type" neighbours of the node Node in the graph and returns them.
You may take as many steps as necessary.
Here are some examples:
{examples}
(END OF EXAMPLES)
Definition of the graph: {graph_definition}
Question: {question} Please answer by providing node main feature (e.g., names) rather than node IDs. {scratchpad}"""

GRAPHCOT_EXAMPLES = """Definition of the graph: {graph_definition}
Question: Who is the author of the book 'The Great Gatsby'?
Thought 1: The question is asking for the author of a specific book (The Great Gatsby). We need to find the book node in the graph.
Action 1: RetrieveNode[The Great Gatsby]
Observation 1: The ID of this retrieval target node is book-4671.
Thought 2: The question is asking for the author of the book. We need to check the book node's author neighbor from the graph.
Action 2: NeighbourCheck[book-4671, author]
Observation 2: The author neighbors of book-4671 are: ['author-16']. 
Thought 3: The ID of the author is author-16. We need to check the name.
Action 3: NodeFeature[author-16, name]
Observation 3: The name feature of author-16 are: F. Scott Fitzgerald. 
Thought 4: The author of 'The Great Gatsby' is F. Scott Fitzgerald.
Action 4: Finish[F. Scott Fitzgerald]

Definition of the graph: {graph_definition}
Question: In what year was the book '1984' published?
Thought 1: The question is asking for the publication year of a specific book (1984). We need to find the book node in the graph.
Action 1: RetrieveNode[1984]
Observation 1: The ID of this retrieval target node is book-5470.
Thought 2: We need to check the book node's publication_year feature from the graph.
Action 2: NodeFeature[book-5470, publication_year]
Observation 2: The publication_year feature of book-5470 are: 1949. 
Thought 3: The book '1984' was published in 1949.
Action 3: Finish[1949]

Definition of the graph: {graph_definition}
Question: How many books are part of the series 'The Hunger Games'?
Thought 1: We need to find the series node for 'The Hunger Games' to count its books.
Action 1: RetrieveNode[The Hunger Games]
Observation 1: The ID of this retrieval target node is series-0.
Thought 2: Now that we have the series node, we need to calculate the node's book neighbor degree from the graph.
Action 2: NodeDegree[series-0, book]
Observation 2: The book neighbor node degree of series-0 are: 3. 
Thought 3: The number of books in the series is 3.
Action 3: Finish[3]"""


def graphcot_prompt(question: str, scratchpad: str, graph_definition: str) -> list[Segment]:
    examples = GRAPHCOT_EXAMPLES.format(graph_definition=graph_definition)
    head, _, _ = GRAPHCOT_INSTRUCTION.partition("Question: {question}")
    template = head.format(examples=examples, graph_definition=graph_definition)
    tail = (f"Question: {question} Please answer by providing node main feature (e.g., names) rather than node "
            f"IDs. ")
    return [Segment("system", GRAPHCOT_SYSTEM, "system"), Segment("user", template, "template"),
            Segment("user", tail, "question"), Segment("user", scratchpad, "private")]


# ------------------------------------------------------------------------------ GLM

GLM_SYSTEM = """You are one of several agents that answer questions about a graph together.
{graph_definition}
Nodes are named by ids such as book-2767052, author-0 or series-0."""

C_TEMPLATE = """Task: classify the question. Reply "deterministic" when one lookup of a node's feature or neighbours answers it, or "non-deterministic" when it needs several hops, counting or comparing.
Question: Who penned the book Emma?
Class: deterministic
Question: In what year was the book Dune published?
Class: deterministic
Question: Which book by author Jane Austen has the highest average rating?
Class: non-deterministic
Question: How many books has author Leo Tolstoy written?
Class: non-deterministic
"""

R_TEMPLATE = """Task: you are the reasoning agent. Read the facts and the notebook. If they answer the question, reply "Answer: " and the answer, with names and titles rather than node ids. Otherwise reply "Missing: " and the one piece of information still needed. Reply with one line.
Example: Notebook: - the authors of the book Emma -> Jane Austen
Reply: Answer: Jane Austen
Example: Notebook: (empty)
Reply: Missing: the book node of Emma and the names of its authors
"""

A_TEMPLATE = """Task: you are the action agent. Write Python code that finds the missing information in the graph with these functions:
RetrieveNode(text) returns the id of the node whose title or name matches text.
NodeFeature(node_id, feature) returns the value of a feature.
NodeDegree(node_id, neighbor_type) returns the number of neighbors of that type.
NeighbourCheck(node_id, neighbor_type) returns the list of neighbor ids of that type.
Use only these functions, literals, arithmetic, comparisons, if, for and print. Print only the information asked for. Reply with the code only.
Example: Missing: the names of the authors of the book Emma
Code:
book = RetrieveNode("Emma")
names = []
for a in NeighbourCheck(book, "author"):
    names.append(NodeFeature(a, "name"))
print(", ".join(names))
Example: Missing: the number of books in the series Discworld
Code:
print(NodeDegree(RetrieveNode("Discworld"), "book"))
"""


@dataclasses.dataclass
class NotebookEntry:
    need: str
    output: str
    error: str | None


def _vertex_segments(facts: dict[str, str], *, sharing: bool) -> list[Segment]:
    """One segment per vertex; sorted by id with sharing on, discovery order otherwise."""
    ids = sorted(facts) if sharing else list(facts)
    return [Segment("user", f"{facts[v]}\n", "vertex", vertex=v) for v in ids]


def _notebook_text(entries: Sequence[NotebookEntry]) -> str:
    if not entries:
        return "Notebook: (empty)\n"
    lines = []
    for e in entries:
        result = e.output.strip().replace("\n", "; ") if e.error is None else f"error: {e.error}"
        lines.append(f"- {e.need} -> {result or '(nothing printed)'}")
    return "Notebook:\n" + "\n".join(lines) + "\n"


def glm_system(graph_definition: str) -> Segment:
    return Segment("system", GLM_SYSTEM.format(graph_definition=graph_definition), "system")


def c_prompt(system: Segment, question: str) -> list[Segment]:
    return [system, Segment("user", C_TEMPLATE, "template"), Segment("user", f"Question: {question}\nClass:", "question")]


def r_prompt(system: Segment, question: str, facts: dict[str, str], notebook: Sequence[NotebookEntry], *,
             sharing: bool) -> list[Segment]:
    return _agent_prompt(system, R_TEMPLATE, question, facts, _notebook_text(notebook) + "Reply:", sharing=sharing)


def a_prompt(system: Segment, question: str, need: str, facts: dict[str, str], notebook: Sequence[NotebookEntry],
             *, sharing: bool) -> list[Segment]:
    private = _notebook_text(notebook) + f"Missing: {need}\nCode:\n"
    return _agent_prompt(system, A_TEMPLATE, question, facts, private, sharing=sharing)


def _agent_prompt(system: Segment, template: str, question: str, facts: dict[str, str], private: str, *,
                  sharing: bool) -> list[Segment]:
    head = [system, Segment("user", template, "template")]
    q = Segment("user", f"Question: {question}\n", "question")
    if sharing:
        facts_head = [Segment("user", "Facts:\n", "template")] if facts else []
        return head + facts_head + _vertex_segments(facts, sharing=True) + [q, Segment("user", private, "private")]
    facts_text = "".join(s.text for s in _vertex_segments(facts, sharing=False))
    return head + [q, Segment("user", (f"Facts:\n{facts_text}" if facts else "") + private, "private")]
