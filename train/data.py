"""A deterministic data pipeline keyed by global sample index.

Sample `i` of a run is a pure function of (data seed, i): the batch of step s is samples
s*B .. s*B+B-1, whatever the device count, the micro-batch plan or a restart. Nothing about data
order is stored in checkpoints beyond the step.

Sources (`data.source`):

* `synthetic`: walks of a fixed random Markov chain over the vocabulary (each token has 4
  possible successors; the chain is seeded by the data seed, each walk by (seed, index)). The
  model can learn the transitions quickly, so the loss falls visibly within tens of steps (from
  ln V toward the chain's entropy, about 1 nat). For tests and demos.
* `tokens`: pre-tokenized files: `.npy` arrays, or raw `.bin` files of `data.token_dtype`
  (nanoGPT-style uint16). Files are concatenated into one token stream. Signed arrays may hold
  masked tokens: -(t+1) is token t with no loss on predicting it (a prompt in supervised
  fine-tuning), -1 is padding (see `jaxsys.train.objective.input_ids`).
* `text`: UTF-8 text files tokenized on load, with `data.tokenizer` = `bytes` (ids 0-255, 256
  separates files) or a folder holding an HF `tokenizer.json`.

For file sources the stream is cut into windows of seq_len+1 tokens; epoch e visits the windows in
the order of a permutation seeded by (seed, e).
"""

from __future__ import annotations

import glob
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from jaxsys.train.config import LMDataConfig, TrainConfigError

BYTES_EOS = 256


class DataSource(Protocol):
    seq_len: int

    def sample(self, index: int) -> np.ndarray:
        """Tokens [seq_len + 1] int32 of global sample `index`."""


class SyntheticSource:
    """Walks of a seeded random Markov chain with `fanout` successors per token."""

    def __init__(self, *, vocab_size: int, seq_len: int, seed: int = 0, fanout: int = 4):
        self.vocab_size, self.seq_len, self.seed = vocab_size, seq_len, seed
        rng = np.random.default_rng([seed, 2**31])
        self.successors = rng.integers(0, vocab_size, (vocab_size, fanout))
        self.cum = np.cumsum(rng.dirichlet(np.ones(fanout), vocab_size), axis=1)

    def sample(self, index: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, index])
        u = rng.random(self.seq_len)
        out = np.empty(self.seq_len + 1, np.int32)
        out[0] = rng.integers(0, self.vocab_size)
        for t in range(self.seq_len):
            row = out[t]
            out[t + 1] = self.successors[row, min(int(np.searchsorted(self.cum[row], u[t])), self.cum.shape[1] - 1)]
        return out


class StreamSource:
    """Windows of one token stream, visited in a seeded permutation per epoch."""

    def __init__(self, stream: np.ndarray, *, seq_len: int, seed: int = 0, name: str = "data"):
        self.stream, self.seq_len, self.seed = stream, seq_len, seed
        self.num_windows = (len(stream) - 1) // seq_len
        if self.num_windows < 1:
            raise TrainConfigError(f"{name}: {len(stream)} tokens is fewer than one window of "
                                   f"seq_len+1 = {seq_len + 1}")
        self._perm: tuple[int, np.ndarray] | None = None

    def _order(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.num_windows))
        return self._perm[1]

    def sample(self, index: int) -> np.ndarray:
        epoch, j = divmod(index, self.num_windows)
        w = int(self._order(epoch)[j])
        start = w * self.seq_len
        return np.asarray(self.stream[start:start + self.seq_len + 1], dtype=np.int32)


def _expand(paths: Sequence[str]) -> list[Path]:
    out: list[Path] = []
    for p in paths:
        hits = sorted(glob.glob(str(Path(p).expanduser())))
        if not hits:
            raise TrainConfigError(f"data.paths: no file matches {p!r}")
        out += [Path(h) for h in hits]
    return out


def _load_tokens(paths: list[Path], dtype: str) -> np.ndarray:
    parts = []
    for p in paths:
        if p.suffix == ".npy":
            parts.append(np.load(p, mmap_mode="r").reshape(-1))
        else:
            parts.append(np.memmap(p, dtype=np.dtype(dtype), mode="r"))
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _tokenize(paths: list[Path], tokenizer: str) -> np.ndarray:
    ids: list[int] = []
    if tokenizer == "bytes":
        for p in paths:
            ids += list(p.read_bytes()) + [BYTES_EOS]
        return np.asarray(ids, np.int32)
    from jaxsys.models.tokenizer import Tokenizer

    tok = Tokenizer.from_folder(tokenizer)
    eos = tok.eos_token_ids[0] if tok.eos_token_ids else None
    for p in paths:
        ids += tok.encode(p.read_text(encoding="utf-8"), add_special_tokens=False)
        if eos is not None:
            ids.append(eos)
    return np.asarray(ids, np.int32)


def make_source(data: LMDataConfig, *, vocab_size: int) -> DataSource:
    if data.source == "synthetic":
        return SyntheticSource(vocab_size=vocab_size, seq_len=data.seq_len, seed=data.seed)
    paths = _expand(data.paths)
    if data.source == "tokens":
        stream = _load_tokens(paths, data.token_dtype)
    else:
        stream = _tokenize(paths, data.tokenizer)
    if len(stream):
        hi, lo = int(np.max(stream)), int(np.min(stream))
        if hi >= vocab_size or lo < -vocab_size:  # -(t+1): masked token t
            raise TrainConfigError(f"data: token ids span [{lo}, {hi}], outside the model's vocab_size "
                                   f"{vocab_size} (masked tokens: -vocab_size..-1)")
    return StreamSource(stream, seq_len=data.seq_len, seed=data.seed, name=str(paths[0]))


def batch_for_step(source: DataSource, step: int, global_batch: int) -> np.ndarray:
    """Tokens [B, T+1] of step `step`: global samples step*B .. step*B + B - 1."""
    base = step * global_batch
    return np.stack([source.sample(base + j) for j in range(global_batch)])
