"""prefopt: fused kernels for preference-optimization training of language models.

Per-token and per-sequence log-probabilities (and softmax statistics) of labels under
softmax(logits), in one streaming pass with O(tokens) extra memory, and the preference losses
(DPO family, IPO, KTO, SimPO, ORPO, CPO) on per-sequence log-probs.
"""

from ._types import TokenStats
from .backends import BackendUnavailableError
from .logprobs import selective_log_softmax, sequence_logprobs, token_logprobs, token_stats
from .losses import PreferenceLossOutput, cpo_loss, dpo_loss, ipo_loss, kto_kl, kto_loss, orpo_loss, simpo_loss

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "PreferenceLossOutput",
    "TokenStats",
    "cpo_loss",
    "dpo_loss",
    "ipo_loss",
    "kto_kl",
    "kto_loss",
    "orpo_loss",
    "selective_log_softmax",
    "sequence_logprobs",
    "simpo_loss",
    "token_logprobs",
    "token_stats",
]
