"""The preference losses on per-sequence log-probabilities (see :mod:`prefopt.losses.api`)."""

from .api import (
    CPO_LOSS_TYPES,
    DPO_LOSS_TYPES,
    KTO_LOSS_TYPES,
    LOSS_BACKENDS,
    REDUCTIONS,
    PreferenceLossOutput,
    cpo_loss,
    dpo_loss,
    ipo_loss,
    kto_kl,
    kto_loss,
    orpo_loss,
    simpo_loss,
)

__all__ = [
    "CPO_LOSS_TYPES",
    "DPO_LOSS_TYPES",
    "KTO_LOSS_TYPES",
    "LOSS_BACKENDS",
    "REDUCTIONS",
    "PreferenceLossOutput",
    "cpo_loss",
    "dpo_loss",
    "ipo_loss",
    "kto_kl",
    "kto_loss",
    "orpo_loss",
    "simpo_loss",
]
