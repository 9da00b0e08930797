"""Values every layer shares, kernels included: loss codes, loss-type names and metric names
(the vocabulary the loss API, the Triton kernel and the CUDA C++ launchers share), and the
no-label sentinel.

A leaf module (no torch, nothing of prefopt imported), so the kernels below the op layer can read
the codes without importing the layer above them.

``NO_LABEL``: the label no vocabulary column has (int64's minimum). It is the ignore_index the
operators run with where the caller has none (then no position matches it), the label of a
position TRL's ``row_mask`` switches off, and the local label of an ignored row on a
vocabulary-parallel rank (where the caller's ignore_index may be a valid local id).
"""

NO_LABEL = -(2**63)

DPO_LOSS_TYPES: tuple[str, ...] = (
    "sigmoid",
    "robust",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sigmoid_norm",
    "sft",
)
KTO_LOSS_TYPES: tuple[str, ...] = ("kto", "apo_zero_unpaired")
CPO_LOSS_TYPES: tuple[str, ...] = ("sigmoid", "hinge", "ipo", "simpo")
REDUCTIONS: tuple[str, ...] = ("mean", "sum", "none")
# TRL's f_divergence_type values, in the order of the kernels' codes (reverse_kl, the default, is 0).
F_DIVERGENCE_TYPES: tuple[str, ...] = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")

FAMILIES = ("dpo", "kto", "cpo", "orpo")

# The codes both fused kernels give the families and the loss types: the Triton kernel's
# constants and the enums of csrc/prefopt_csrc.h (tests/test_csrc.py holds the header to them).
LOSS_FAMILY_CODES = {family: code for code, family in enumerate(FAMILIES)}
LOSS_TYPE_CODES = {
    kind: code
    for code, kind in enumerate((
        "sigmoid", "robust", "hinge", "ipo", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "apo_zero",
        "apo_down", "discopop", "sigmoid_norm", "simpo", "kto", "apo_zero_unpaired",
    ))
}

# The batch metrics each family's kernel writes, in its order; named as TRL logs them.
_PAIR_METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)
METRIC_NAMES: dict[str, tuple[str, ...]] = {
    "dpo": _PAIR_METRICS,
    "cpo": _PAIR_METRICS,
    "kto": (
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
        "count/chosen",
        "count/rejected",
    ),
    "orpo": _PAIR_METRICS + ("log_odds_ratio", "log_odds_chosen", "nll_loss"),
}

# The backends with a fused loss kernel.
FUSED_BACKENDS = ("triton", "cuda")
