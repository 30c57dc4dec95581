"""Speculative decoding, the engine-independent parts: the exact acceptance rule, the drafts'
proposal logic (early-exit self-draft, n-gram prompt lookup), the serving configuration
(`SpeculativeConfig`) and a cache-free reference loop.

The engine's verify step (`jaxsys.serve.engine.verify`: gamma + 1 positions per request over the
paged KV cache, rejected K/V overwritten by the next step) runs these drafts and calls
`verify_draft` on the probabilities it computes; `ServingLLM(..., speculate=...)` turns it on.
"""

from jaxsys.serve.speculative.acceptance import expected_tokens_per_step as expected_tokens_per_step
from jaxsys.serve.speculative.acceptance import greedy_accept as greedy_accept
from jaxsys.serve.speculative.acceptance import probs_from_logits as probs_from_logits
from jaxsys.serve.speculative.acceptance import verify_draft as verify_draft
from jaxsys.serve.speculative.config import SpeculativeConfig as SpeculativeConfig
from jaxsys.serve.speculative.drafts import DraftError as DraftError
from jaxsys.serve.speculative.drafts import check_draft_vocab as check_draft_vocab
from jaxsys.serve.speculative.drafts import early_exit_draft as early_exit_draft
from jaxsys.serve.speculative.drafts import ngram_propose as ngram_propose
from jaxsys.serve.speculative.drafts import ngram_propose_host as ngram_propose_host
from jaxsys.serve.speculative.drafts import one_hot_probs as one_hot_probs

__all__ = ["DraftError", "SpeculativeConfig", "check_draft_vocab", "early_exit_draft", "expected_tokens_per_step",
           "greedy_accept", "ngram_propose", "ngram_propose_host", "one_hot_probs", "probs_from_logits", "verify_draft"]
