"""prefopt: fused kernels for preference-optimization training of language models.

Per-token and per-sequence log-probabilities (and softmax statistics) of labels under
softmax(logits), in one streaming pass with O(tokens) extra memory, and the preference losses
(DPO family, IPO, KTO, SimPO, ORPO, CPO) on per-sequence log-probs, with a fused loss-reduction
kernel; end-to-end loss modules from logits or the LM head's inputs (``prefopt.nn``) and a training monitor
(``prefopt.diagnostics``). The same log-probs from hidden states and the LM-head weight
(``linear_*``), without ever building the logits.
"""

from ._types import TokenStats
from .backends import BackendUnavailableError
from .diagnostics import PreferenceMonitor, PreferenceTrainingWarning
from .logprobs import (linear_sequence_logprobs, linear_token_logprobs, linear_token_stats, selective_log_softmax,
                       sequence_logprobs, token_logprobs, token_stats)
from .losses import PreferenceLossOutput, cpo_loss, dpo_loss, ipo_loss, kto_kl, kto_loss, orpo_loss, simpo_loss
from .nn import DPOLoss, IPOLoss, KTOLoss, LMHeadInput, ORPOLoss, SimPOLoss

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "DPOLoss",
    "IPOLoss",
    "KTOLoss",
    "LMHeadInput",
    "ORPOLoss",
    "PreferenceLossOutput",
    "PreferenceMonitor",
    "PreferenceTrainingWarning",
    "SimPOLoss",
    "TokenStats",
    "cpo_loss",
    "dpo_loss",
    "ipo_loss",
    "kto_kl",
    "kto_loss",
    "linear_sequence_logprobs",
    "linear_token_logprobs",
    "linear_token_stats",
    "orpo_loss",
    "selective_log_softmax",
    "sequence_logprobs",
    "simpo_loss",
    "token_logprobs",
    "token_stats",
]
