"""Compiles the fused loss kernel (``prefopt.kernels.preference_loss``) for sm_90, without a GPU,
for every family, loss type, optional input, direction and compute dtype the launcher can choose.

The interpreter that runs the CPU tests executes the kernel as Python, so it accepts what the
compiler refuses (a global that is not a constexpr, a branch whose sides disagree in type); this
is the check that the GPU will find something to run. Run by tests/test_fused_losses.py in a
process of its own (without TRITON_INTERPRET); prints one line per compiled launch.
"""

import sys
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benches"))
import kernel_report  # noqa: E402  (the JIT-faithful meta pointers and the sm_90 target)

from prefopt._codes import CPO_LOSS_TYPES, F_DIVERGENCE_TYPES  # noqa: E402
from prefopt.kernels import preference_loss  # noqa: E402
from prefopt.losses.fused import LossCall, LossGrads, LossOutputs  # noqa: E402

BATCH = 64
ELEMENTWISE_DPO_TYPES = ("sigmoid", "robust", "hinge", "ipo", "exo_pair", "nca_pair", "bco_pair", "sppo_hard",
                         "apo_zero", "apo_down", "discopop", "sigmoid_norm")


def _meta(shape, dtype):
    return torch.empty(shape, dtype=dtype, device="meta")


def calls(dtype: torch.dtype):
    vector = _meta(BATCH, dtype)
    lengths = _meta(BATCH, torch.int64)
    pair = dict(chosen=vector, rejected=vector, ref_chosen=vector, ref_rejected=vector, margin=None,
                chosen_lengths=None, rejected_lengths=None, desirable=None, offset=None, nll=None, pair_weights=None,
                loss_types=(), loss_weights=(), beta=0.1, label_smoothing=0.1, discopop_tau=0.05, simpo_gamma=0.5,
                cpo_alpha=0.0, desirable_weight=1.0, undesirable_weight=1.0, offset_value=0.0,
                f_divergence="reverse_kl", f_alpha_divergence_coef=0.5, alpha=0.0, mean=True)
    every_dpo_type = dict(loss_types=ELEMENTWISE_DPO_TYPES, loss_weights=(1.0,) * len(ELEMENTWISE_DPO_TYPES),
                          margin=vector, chosen_lengths=lengths, rejected_lengths=lengths, pair_weights=vector,
                          offset=_meta((), dtype))
    for f_divergence in F_DIVERGENCE_TYPES:
        yield LossCall("dpo", **{**pair, **every_dpo_type, "f_divergence": f_divergence})
    yield LossCall("dpo", **{**pair, "loss_types": ("ipo",), "loss_weights": (1.0,), "mean": False})
    unpaired = {**pair, "rejected": None, "ref_rejected": None, "desirable": _meta(BATCH, torch.bool),
                "loss_weights": (1.0,)}
    yield LossCall("kto", **{**unpaired, "loss_types": ("kto",), "offset": _meta((), dtype)})
    yield LossCall("kto", **{**unpaired, "loss_types": ("apo_zero_unpaired",)})
    reference_free = {**pair, "ref_chosen": None, "ref_rejected": None}
    for kind in CPO_LOSS_TYPES:
        yield LossCall("cpo", **{**reference_free, "loss_types": (kind,), "loss_weights": (1.0,),
                                 "chosen_lengths": lengths, "rejected_lengths": lengths, "cpo_alpha": 1.0,
                                 "alpha": 0.5 if kind == "simpo" else 0.0})
    for nll in (None, _meta((), dtype), vector):
        yield LossCall("orpo", **{**reference_free, "nll": nll})


class _Recorder:
    """Stands in for the kernel in its module: records each ``kernel[grid](...)``."""

    def __init__(self) -> None:
        self.launches = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((args, kwargs))


def main() -> None:
    kernel = preference_loss._preference_loss_kernel
    recorder = _Recorder()
    preference_loss._preference_loss_kernel = recorder
    for dtype in (torch.float32, torch.float64):
        for call in calls(dtype):
            like = lambda t: None if t is None else _meta(t.shape, dtype)  # noqa: E731
            preference_loss.launch(call, LossOutputs(_meta((), dtype), *(_meta(BATCH, dtype),) * 3,
                                                     _meta(9, dtype)), None)
            preference_loss.launch(call, None, LossGrads(_meta((), dtype), _meta(BATCH, dtype), like(call.chosen),
                                                         like(call.rejected), like(call.ref_chosen),
                                                         like(call.ref_rejected), like(call.margin), like(call.nll)))
    target = GPUTarget(*kernel_report.TRITON_TARGET)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    for args, kwargs in recorder.launches:
        kwargs = {**kwargs, "debug": False}
        pointers = [kernel_report._DevicePointer(a) if isinstance(a, torch.Tensor) else a for a in args]
        bound, specialization, binder_options = binder(*pointers, **kwargs)
        options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization,
                                                                  binder_options)
        compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                                  options=options.__dict__)
        mode = "backward" if kwargs["BACKWARD"] else "forward"
        print(f"compiled {compiled.metadata.name} family={kwargs['FAMILY']} kinds={kwargs['KINDS']} "
              f"{mode} {kwargs['DTYPE']}")


if __name__ == "__main__":
    main()
