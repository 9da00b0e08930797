"""Per-token statistics of log softmax(z) at the labels, z = softcap(logits) / temperature, and
their sums over completions: from logits, or from hidden states and an LM head without logits.

- ``api``: the public functions on logits (validation, dispatch, the vocabulary-parallel
  combination), ``linear``: the same from an LM head's inputs (its API, operator and tiles);
- ``op``: the ``torch.library`` operators every fused backend runs under, with their fake and
  autograd registrations; ``torch_backend``: the chunked PyTorch fallback (backend "torch");
- ``reference``: the plain-PyTorch float64-capable oracle; ``transform``: z and its backward,
  shared by the oracle and the PyTorch paths; ``layout``: blocks of rows the kernels take;
- ``distributed``: the combination of vocabulary shards across ranks.
"""

from .api import selective_log_softmax, sequence_logprobs, token_logprobs, token_stats
from .linear import linear_sequence_logprobs, linear_token_logprobs, linear_token_stats

__all__ = ["linear_sequence_logprobs", "linear_token_logprobs", "linear_token_stats", "selective_log_softmax",
           "sequence_logprobs", "token_logprobs", "token_stats"]
