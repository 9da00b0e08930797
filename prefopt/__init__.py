"""prefopt: fused kernels for preference-optimization training of language models.

Per-token and per-sequence log-probabilities (and softmax statistics) of labels under
softmax(logits), in one streaming pass with O(tokens) extra memory.
"""

from ._types import TokenStats
from .backends import BackendUnavailableError
from .logprobs import selective_log_softmax, sequence_logprobs, token_logprobs, token_stats

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "TokenStats",
    "selective_log_softmax",
    "sequence_logprobs",
    "token_logprobs",
    "token_stats",
]
