"""How the serving engine speculates: which draft, how many tokens it proposes, the compiled set.

The engine's verify step has static shapes, [batch bucket, gamma + 1, page bucket], so gamma is
one of a small compiled set (`gammas`): switching among them in steady state reuses executables
compiled the first time each was seen, and a gamma outside the set is refused up front (it would
compile a new program in the middle of serving).
"""

from __future__ import annotations

import dataclasses

from jaxsys.serve.speculative.drafts import DraftError

DRAFTS = ("ngram", "self", "model")


@dataclasses.dataclass(frozen=True)
class SpeculativeConfig:
    """draft: "ngram" (prompt lookup, on the host), "self" (early exit: the target's first
    `draft_layers` layers + its final norm and LM head, reading the target's KV cache) or "model"
    (another model with the target's vocabulary, given to the engine; it re-reads the last
    `window` context tokens each step instead of keeping a KV cache).
    draft_layers: depth of the "self" draft; None takes half the target's layers.
    """

    draft: str = "ngram"
    gamma: int = 4
    gammas: tuple[int, ...] = (1, 2, 4, 8)
    draft_layers: int | None = None
    max_ngram: int = 3
    min_ngram: int = 1
    window: int = 64

    def __post_init__(self):
        object.__setattr__(self, "gammas", tuple(sorted(set(int(g) for g in self.gammas))))
        if self.draft not in DRAFTS:
            raise DraftError(f"unknown draft {self.draft!r}; choose one of {', '.join(DRAFTS)}")
        if not self.gammas or self.gammas[0] < 1:
            raise DraftError(f"the compiled gamma set must hold integers >= 1, got {self.gammas}")
        self.check_gamma(self.gamma)
        if self.draft_layers is not None and self.draft_layers < 1:
            raise DraftError(f"draft_layers must be >= 1, got {self.draft_layers}")
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise DraftError(f"need 1 <= min_ngram <= max_ngram, got {self.min_ngram}, {self.max_ngram}")
        if self.window < 1:
            raise DraftError(f"window must be >= 1, got {self.window}")

    def check_gamma(self, gamma: int) -> None:
        if gamma not in self.gammas:
            raise DraftError(f"gamma {gamma} is outside the compiled set {list(self.gammas)}; "
                             f"pick one of them or add it to SpeculativeConfig.gammas")
