"""Graphs in GRBench's public schema, and the four graph functions of Graph-CoT.

The schema (GRBench's `graph.json`, see `GRBENCH_DATA_README.md` of the Graph-CoT repository):

    {"<type>_nodes": {"<node id>": {"features": {<name>: <value>, ...},
                                    "neighbors": {<neighbor type>: [<node id>, ...], ...}}}}

Node ids are unique across types (Graph-CoT indexes every node by id alone). Feature values are
strings, numbers, booleans, lists or dicts; neighbor types name a relation (`author`, `series`,
`similar_books`, `cited_by`, ...) and map to lists of node ids.

The graph functions answer exactly what Graph-CoT's `graph_funcs` answers, but raise typed errors
(`UnknownNodeError`, `UnknownFeatureError`, `UnknownNeighborTypeError`) whose messages name what
exists, so an agent (or a user) can correct itself. `retrieve_node` is lexical: an exact match of a
node's text (case and spacing folded) wins, otherwise BM25 (`bm25s`) over the node texts picks the
best node. Graph-CoT embeds node texts with a sentence-transformer instead; that model cannot be
downloaded here, and exact titles are what the question templates quote.
"""

from __future__ import annotations

import json
import os
import re
import threading
from pathlib import Path
from typing import Any, Mapping

# Which feature is a node type's text (what RetrieveNode searches), as in Graph-CoT's NODE_TEXT_KEYS;
# types not listed use the first of these features that they have.
TEXT_FEATURES = ("title", "name", "full_name", "case_name", "plain_text")
_SPACES = re.compile(r"\s+")


class GraphError(ValueError):
    """Base of the graph errors: each message says what is wrong and what exists."""


class GraphSchemaError(GraphError):
    """A graph file or dict that does not follow the `<type>_nodes` schema."""


class UnknownNodeError(GraphError, KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


class UnknownFeatureError(GraphError, KeyError):
    def __str__(self) -> str:
        return self.args[0]


class UnknownNeighborTypeError(GraphError, KeyError):
    def __str__(self) -> str:
        return self.args[0]


def _fold(text: str) -> str:
    return _SPACES.sub(" ", text).strip().casefold()


def validate_schema(data: Any, *, source: str = "graph") -> None:
    """Raise `GraphSchemaError` naming the first place where `data` leaves the schema."""
    if not isinstance(data, Mapping) or not data:
        raise GraphSchemaError(f"{source}: expected a JSON object of '<type>_nodes' entries, got "
                               f"{type(data).__name__ if data else 'an empty object'}")
    seen: dict[str, str] = {}
    for key, nodes in data.items():
        if not isinstance(key, str) or not key.endswith("_nodes") or key == "_nodes":
            raise GraphSchemaError(f"{source}: top-level key {key!r} is not of the form '<type>_nodes' "
                                   f"(e.g. 'book_nodes')")
        if not isinstance(nodes, Mapping):
            raise GraphSchemaError(f"{source}: {key} must map node ids to nodes, got {type(nodes).__name__}")
        for nid, node in nodes.items():
            where = f"{source}: {key}[{nid!r}]"
            if not isinstance(node, Mapping) or set(node) != {"features", "neighbors"}:
                got = sorted(node) if isinstance(node, Mapping) else type(node).__name__
                raise GraphSchemaError(f"{where}: a node is an object with exactly 'features' and "
                                       f"'neighbors', got {got}")
            if not isinstance(node["features"], Mapping):
                raise GraphSchemaError(f"{where}.features must be an object")
            if not isinstance(node["neighbors"], Mapping):
                raise GraphSchemaError(f"{where}.neighbors must be an object")
            for rel, ids in node["neighbors"].items():
                if not isinstance(ids, list) or not all(isinstance(i, (str, int)) for i in ids):
                    raise GraphSchemaError(f"{where}.neighbors[{rel!r}] must be a list of node ids")
            if nid in seen:
                raise GraphSchemaError(f"{source}: node id {nid!r} appears in both {seen[nid]} and {key}; "
                                       f"node ids must be unique across types")
            seen[nid] = key


class Graph:
    """A validated graph with an id index, node texts, a BM25 index and the graph functions.

    Thread-safe for reading; the BM25 index is built on the first `retrieve_node` call.
    """

    def __init__(self, data: Mapping[str, Mapping[str, Any]], *, name: str = "graph",
                 text_features: Mapping[str, str] | None = None):
        validate_schema(data, source=name)
        self.name = name
        self.data = data
        self.types: list[str] = [k[:-len("_nodes")] for k in data]
        self._type_of: dict[str, str] = {}
        self._nodes: dict[str, Mapping[str, Any]] = {}
        for key, nodes in data.items():
            t = key[:-len("_nodes")]
            for nid, node in nodes.items():
                self._type_of[str(nid)] = t
                self._nodes[str(nid)] = node
        self.text_feature = {t: self._pick_text_feature(t, (text_features or {}).get(t)) for t in self.types}
        self._schema: dict[str, dict[str, list[str]]] | None = None
        self._index_lock = threading.Lock()
        self._bm25 = None
        self._ids: list[str] = []
        self._exact: dict[str, str] = {}

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, path: str | os.PathLike, **kw) -> "Graph":
        """Load a GRBench-style `graph.json` (clear `GraphSchemaError` when it does not match)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no graph file at {path}")
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except json.JSONDecodeError as e:
            raise GraphSchemaError(f"{path}: not valid JSON ({e})") from None
        return cls(data, name=kw.pop("name", path.stem), **kw)

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.data, ensure_ascii=False), encoding="utf-8")

    def _pick_text_feature(self, node_type: str, requested: str | None) -> str | None:
        nodes = self.data[f"{node_type}_nodes"]
        first = next(iter(nodes.values()), None)
        feats = first["features"] if first is not None else {}
        if requested is not None:
            if first is not None and requested not in feats:
                raise GraphSchemaError(f"{self.name}: text feature {requested!r} of {node_type} nodes does not exist; "
                                       f"features: {sorted(feats)}")
            return requested
        return next((f for f in TEXT_FEATURES if f in feats), next(iter(feats), None))

    # ------------------------------------------------------------------ description
    def __len__(self) -> int:
        return len(self._nodes)

    def __contains__(self, node_id: object) -> bool:
        return str(node_id) in self._nodes

    def node_ids(self, node_type: str | None = None) -> list[str]:
        if node_type is None:
            return list(self._nodes)
        return [str(i) for i in self.data[f"{node_type}_nodes"]]

    def node_type(self, node_id: str) -> str:
        return self._type_of[self._check_node(node_id)]

    def schema(self) -> dict[str, dict[str, list[str]]]:
        """Per node type: the feature names and neighbor types its nodes have (first-seen order)."""
        if self._schema is not None:
            return self._schema
        out = {}
        for t in self.types:
            feats: dict[str, None] = {}
            rels: dict[str, None] = {}
            for node in self.data[f"{t}_nodes"].values():
                feats.update(dict.fromkeys(node["features"]))
                rels.update(dict.fromkeys(node["neighbors"]))
            out[t] = {"features": list(feats), "neighbors": list(rels)}
        self._schema = out
        return out

    def definition(self) -> str:
        """The graph definition paragraph of Graph-CoT's prompt, written from the schema."""
        schema = self.schema()
        types = list(schema)
        listing = types[0] if len(types) == 1 else ", ".join(types[:-1]) + f" and {types[-1]}"
        lines = [f"There are {len(types)} types of nodes in the graph: {listing}."]
        lines.append(" ".join(f"{t.capitalize()} nodes have features: {', '.join(s['features'])}."
                              for t, s in schema.items()))
        lines.append(" ".join(f"{t.capitalize()} nodes are linked to their "
                              f"{', '.join(r + ' nodes' for r in s['neighbors'])}."
                              for t, s in schema.items() if s["neighbors"]))
        return "\n".join(lines)

    def text(self, node_id: str) -> str:
        node = self._nodes[self._check_node(node_id)]
        feat = self.text_feature[self._type_of[node_id]]
        return "" if feat is None else str(node["features"].get(feat, ""))

    # ------------------------------------------------------------------ the four graph functions
    def _check_node(self, node_id: Any) -> str:
        nid = str(node_id).strip().strip("'\"")
        if nid not in self._nodes:
            raise UnknownNodeError(f"node {nid!r} does not exist in the graph (ids look like "
                                   f"{', '.join(repr(self.node_ids(t)[0]) for t in self.types if self.node_ids(t))}; "
                                   f"use RetrieveNode to find a node's id)")
        return nid

    def retrieve_node(self, keyword: str) -> str | None:
        """The id of the node whose text best matches `keyword`; None when nothing matches."""
        self._build_index()
        hit = self._exact.get(_fold(str(keyword)))
        if hit is not None:
            return hit
        import bm25s

        tokens = bm25s.tokenize([str(keyword)], stopwords="en", return_ids=False, show_progress=False)
        known = [[t for t in tokens[0] if t in self._vocab]]
        if not known[0]:
            return None
        docs, scores = self._bm25.retrieve(known, k=1, show_progress=False, n_threads=1)
        if float(scores[0, 0]) <= 0.0:
            return None
        return self._ids[int(docs[0, 0])]

    def node_feature(self, node_id: str, feature: str) -> Any:
        nid = self._check_node(node_id)
        feats = self._nodes[nid]["features"]
        feature = str(feature).strip().strip("'\"")
        if feature not in feats:
            raise UnknownFeatureError(f"{self._type_of[nid]} node {nid!r} has no feature {feature!r}; "
                                      f"its features are: {', '.join(feats)}")
        return feats[feature]

    def neighbour_check(self, node_id: str, neighbor_type: str) -> list[str]:
        nid = self._check_node(node_id)
        rels = self._nodes[nid]["neighbors"]
        neighbor_type = str(neighbor_type).strip().strip("'\"")
        if neighbor_type not in rels:
            raise UnknownNeighborTypeError(f"{self._type_of[nid]} node {nid!r} has no {neighbor_type!r} neighbors; "
                                           f"its neighbor types are: {', '.join(rels)}")
        return [str(i) for i in rels[neighbor_type]]

    def node_degree(self, node_id: str, neighbor_type: str) -> int:
        return len(self.neighbour_check(node_id, neighbor_type))

    # ------------------------------------------------------------------ retrieval index
    def _build_index(self) -> None:
        if self._bm25 is not None:
            return
        with self._index_lock:
            if self._bm25 is not None:
                return
            import bm25s

            ids = [nid for nid in self._nodes if self.text(nid)]
            texts = [self.text(nid) for nid in ids]
            exact: dict[str, str] = {}
            for nid, text in zip(ids, texts):
                exact.setdefault(_fold(text), nid)
            tokenized = bm25s.tokenize(texts, stopwords="en", show_progress=False)
            index = bm25s.BM25()
            index.index(tokenized, show_progress=False)
            self._vocab = set(tokenized.vocab)
            self._ids, self._exact = ids, exact
            self._bm25 = index

    def warm(self) -> "Graph":
        """Build the retrieval index now (it is otherwise built on the first RetrieveNode)."""
        self._build_index()
        return self


def render_value(value: Any, *, limit: int = 200) -> str:
    """A feature value as one line of text, cut at `limit` characters."""
    if isinstance(value, (list, tuple)):
        text = ", ".join(str(v) for v in value)
    elif isinstance(value, dict):
        text = json.dumps(value, ensure_ascii=False)
    else:
        text = str(value)
    text = _SPACES.sub(" ", text).strip()
    return text if len(text) <= limit else text[:limit - 3] + "..."


def render_vertex(graph: Graph, node_id: str, *, max_neighbors: int = 12) -> str:
    """One vertex as a fixed line of facts: the same vertex renders to the same text every time,
    which is what lets the prefix cache share it across agents and questions."""
    nid = graph._check_node(node_id)
    node = graph._nodes[nid]
    parts = [f"{k}: {render_value(v)}" for k, v in node["features"].items()]
    for rel, ids in node["neighbors"].items():
        shown = ", ".join(str(i) for i in ids[:max_neighbors])
        more = f" (+{len(ids) - max_neighbors} more)" if len(ids) > max_neighbors else ""
        parts.append(f"{rel}: [{shown}{more}]")
    return f"{nid} ({graph.node_type(nid)}) " + "; ".join(parts)
