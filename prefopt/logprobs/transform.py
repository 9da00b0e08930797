"""z = softcap(x) / T, the transform every backend applies to the logits before the softmax,
and its backward: shared by the float64 oracle (``prefopt.logprobs.reference``) and the PyTorch paths of
the operators, so that all of them evaluate it the same way."""

import torch


def transformed_logits(logits: torch.Tensor, temperature: float, softcap: float | None) -> torch.Tensor:
    """z = softcap(x) / T with softcap(x) = c * tanh(x / c), in float32 (float64 for float64)."""
    compute_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    x = logits.to(compute_dtype)
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    return x / temperature


def chain_through_transform_(grad_z: torch.Tensor, logits: torch.Tensor, temperature: float,
                             softcap: float | None) -> torch.Tensor:
    """grad_x = grad_z * dz/dx for z = softcap(x) / T, written over ``grad_z`` (float32/64, any
    shape ``logits`` broadcasts to): the backward of :func:`transformed_logits`, in place so a
    chunk of gradients costs no second buffer."""
    if softcap is not None:
        grad_z *= 1.0 - torch.tanh(logits.to(grad_z.dtype) / softcap).square_()
    return grad_z.div_(temperature)


def scored_logits(logits: torch.Tensor, scored: torch.Tensor, temperature: float,
                  softcap: float | None) -> torch.Tensor:
    """:func:`transformed_logits` of ``logits`` [..., V] with the rows where ``scored`` [...] is
    False replaced by zeros before anything is computed: an ignored row is never read, so NaN or
    inf there cannot reach its gradient (log_softmax's backward would give 0 * NaN = NaN)."""
    return transformed_logits(torch.where(scored.unsqueeze(-1), logits, 0.0), temperature, softcap)
