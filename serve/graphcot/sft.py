"""Fine-tuning data (part D of the issue): oracle traces of both protocols as token rows.

Every LLM call the oracle answers (`oracle.run_oracle`, on the train split) becomes one example:
the prompt exactly as the engine backend sends it (`backends.encode_segments`: the chat template,
tokenized segment by segment), then the oracle's completion and the end-of-turn token the engine
stops on. A model fine-tuned on these examples is trained on the very prompts it is served.

Rows hold one example each, padded, so every example's context is exactly its inference context
(no packing of unrelated calls into one attention window). Prompt tokens are masked: written as
-(t+1), the model reads token t but is not trained to predict it, so the loss is on what the
agent must write. `-1` is padding. This is the encoding of `jaxsys.train`'s `tokens` data source
and objective (`jaxsys.train.objective.input_ids`); the file is the interface between the two
packages, which never import each other.

`write_rows` stores the rows as one flat int32 `.npy` stream followed by one padding token. The
`tokens` source cuts a stream into windows of seq_len + 1 tokens with stride seq_len, so window w
is row w plus the first token of row w + 1: a masked prompt token (or the padding), which carries
no loss.
"""

from __future__ import annotations

import dataclasses
import math
import os
import statistics
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from jaxsys.serve.graphcot.backends import encode_segments
from jaxsys.serve.graphcot.graph import Graph
from jaxsys.serve.graphcot.metrics import exact_match
from jaxsys.serve.graphcot.oracle import run_oracle
from jaxsys.shapes import pow2_bucket

PAD = -1


@dataclasses.dataclass(frozen=True)
class SFTExample:
    """One LLM call of an oracle run: prompt ids as served, then the ids the model must write."""

    system: str
    qid: str
    agent: str
    prompt_ids: tuple[int, ...]
    completion_ids: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)


def end_of_turn_id(tokenizer) -> int:
    """The token the chat template closes an assistant turn with, if the engine stops on it
    (SmolLM2: `<|im_end|>`); otherwise the first end-of-sequence token."""
    if not tokenizer.eos_token_ids:
        raise ValueError("the tokenizer names no end-of-sequence token to end completions with")
    reply = "Reply text."
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Question?"},
                                          {"role": "assistant", "content": reply}], add_generation_prompt=False)
    after = tokenizer.encode(chat[chat.rfind(reply) + len(reply):], add_special_tokens=False)
    if after and after[0] in tokenizer.eos_token_ids:
        return int(after[0])
    return int(tokenizer.eos_token_ids[0])


def sft_examples(graph: Graph, questions: Iterable[dict[str, Any]], tokenizer, *,
                 systems: Sequence[str] = ("glm", "graphcot"), sandbox=None) -> tuple[dict[str, list[SFTExample]],
                                                                                       dict[str, int]]:
    """Examples of every oracle call per system, and per system the questions left out because
    the oracle's answer did not match the gold one (none, unless the graph changed under them)."""
    eot = end_of_turn_id(tokenizer)
    out: dict[str, list[SFTExample]] = {s: [] for s in systems}
    wrong = {s: 0 for s in systems}
    for q in questions:
        for system in systems:
            outcome, calls = run_oracle(system, graph, q, sandbox=sandbox)
            if not exact_match(outcome.answer, q["answer"]):
                wrong[system] += 1
                continue
            for call, completion in calls:
                prompt_ids, _ = encode_segments(tokenizer, call.segments)
                completion_ids = tokenizer.encode(completion, add_special_tokens=False) + [eot]
                out[system].append(SFTExample(system, str(q["qid"]), call.agent, tuple(prompt_ids),
                                              tuple(completion_ids)))
    return out, wrong


def seq_len_for(examples: Sequence[SFTExample], *, cap: int, coverage: float = 0.95) -> int:
    """The power-of-two row length that holds a `coverage` fraction of the examples (the longest
    ones, typically late Graph-CoT steps, would otherwise set every row's length), at most `cap`."""
    if not examples:
        raise ValueError("no examples")
    if not 0 < coverage <= 1:
        raise ValueError(f"coverage must be in (0, 1], got {coverage}")
    lengths = sorted(len(e) for e in examples)
    return min(pow2_bucket(lengths[math.ceil(coverage * len(lengths)) - 1]), cap)


def pack_rows(examples: Sequence[SFTExample], seq_len: int) -> tuple[np.ndarray, int]:
    """Rows [R, seq_len] int32, one example each (prompt masked, completion plain, then padding),
    and how many examples were longer than `seq_len` (left out)."""
    rows, dropped = [], 0
    for ex in examples:
        if len(ex) > seq_len:
            dropped += 1
            continue
        row = np.full(seq_len, PAD, np.int32)
        p = len(ex.prompt_ids)
        row[:p] = -np.asarray(ex.prompt_ids, np.int32) - 1
        row[p:len(ex)] = ex.completion_ids
        rows.append(row)
    return (np.stack(rows) if rows else np.zeros((0, seq_len), np.int32)), dropped


def write_rows(path: str | os.PathLike, rows_RxT: np.ndarray) -> Path:
    """The rows as the flat stream the `tokens` data source reads (see the module docstring)."""
    path = Path(path)
    np.save(path, np.concatenate([rows_RxT.reshape(-1), np.full(1, PAD, np.int32)]))
    return path


def describe(examples: Sequence[SFTExample]) -> dict[str, Any]:
    """Counts and mean token lengths per agent (for the record)."""
    by: dict[str, list[SFTExample]] = {}
    for e in examples:
        by.setdefault(e.agent, []).append(e)
    return {"examples": len(examples), "questions": len({e.qid for e in examples}),
            "mean_prompt_tokens": statistics.mean(len(e.prompt_ids) for e in examples) if examples else 0.0,
            "mean_completion_tokens": statistics.mean(len(e.completion_ids) for e in examples) if examples else 0.0,
            "max_tokens": max((len(e) for e in examples), default=0),
            "agents": {a: len(v) for a, v in sorted(by.items())}}
