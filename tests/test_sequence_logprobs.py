"""Per-sequence sums and means, padded and packed, against sums of the reference token log-probs."""

import pytest
import torch
from conftest import DEVICE, random_labels, random_logits, reference_stats, relative_error

import prefopt


@pytest.mark.parametrize("average", [False, True])
def test_padded_batch(backend, average):
    logits = random_logits((4, 9, 31), torch.float32).requires_grad_(True)
    labels = random_labels((4, 9), 31)
    labels[2] = -100  # a sequence with no completion token
    reference_input = logits.detach().double().cpu().requires_grad_(True)
    token_reference = reference_stats(reference_input, labels, stats=()).logps
    counts = (labels.cpu() != -100).sum(-1)
    expected = token_reference.sum(-1) / (counts.clamp_min(1) if average else 1)

    result = prefopt.sequence_logprobs(logits, labels, average=average, backend=backend)
    assert result.shape == (4,) and result.dtype == torch.float32
    assert result[2] == 0 and not result.isnan().any()
    assert relative_error(result.cpu(), expected) <= 1e-5

    upstream = torch.randn(4, dtype=torch.float64)
    (grad,) = torch.autograd.grad((result * upstream.to(DEVICE, torch.float32)).sum(), logits)
    (expected_grad,) = torch.autograd.grad((expected * upstream).sum(), reference_input)
    assert relative_error(grad.cpu(), expected_grad) <= 1e-5


@pytest.mark.parametrize("packed_shape", ["1d", "2d"])
@pytest.mark.parametrize("average", [False, True])
@pytest.mark.parametrize("offsets_dtype", [torch.int32, torch.int64])
def test_packed_sequences(backend, packed_shape, average, offsets_dtype):
    lengths = [5, 0, 3, 8, 1]
    total = sum(lengths)
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=offsets_dtype, device=DEVICE)
    logits = random_logits((total, 23), torch.float32)
    labels = random_labels((total,), 23)
    labels[5:8] = -100  # the third sequence has no scored token
    if packed_shape == "2d":
        logits, labels = logits.unsqueeze(0), labels.unsqueeze(0)
    logits.requires_grad_(True)

    token_reference = reference_stats(logits.detach(), labels, stats=()).logps.reshape(-1)
    scored = (labels.cpu() != -100).reshape(-1)
    pieces = torch.tensor(lengths).cumsum(0).tolist()
    starts = [0, *pieces[:-1]]
    expected = torch.stack([token_reference[s:e].sum() for s, e in zip(starts, pieces)])
    if average:
        expected = expected / torch.stack([scored[s:e].sum().clamp_min(1) for s, e in zip(starts, pieces)])

    result = prefopt.sequence_logprobs(logits, labels, average=average, cu_seqlens=cu_seqlens, backend=backend)
    assert result.shape == (len(lengths),)
    assert result[1] == 0 and result[2] == 0 and not result.isnan().any()
    assert relative_error(result.cpu(), expected) <= 1e-5
    (grad,) = torch.autograd.grad(result.sum(), logits)
    assert (grad.reshape(total, -1)[~scored.to(DEVICE)] == 0).all()


def test_sequence_of_strided_logits_matches_contiguous(backend):
    full = random_logits((3, 8, 40), torch.bfloat16)
    labels = random_labels((3, 7), 40)
    strided = prefopt.sequence_logprobs(full[:, :-1], labels, backend=backend)
    contiguous = prefopt.sequence_logprobs(full[:, :-1].contiguous(), labels, backend=backend)
    assert torch.equal(strided, contiguous)


def test_selective_log_softmax_matches_trl_semantics(backend):
    logits = random_logits((2, 6, 50), torch.bfloat16)
    index = torch.randint(0, 50, (2, 6), device=DEVICE)
    expected = torch.gather(logits.double().log_softmax(-1), -1, index.unsqueeze(-1)).squeeze(-1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PREFOPT_BACKEND", backend)
        result = prefopt.selective_log_softmax(logits, index)
        tempered = prefopt.selective_log_softmax(logits, index, temperature=0.5)
    assert relative_error(result, expected) <= 1e-5
    expected_tempered = torch.gather((logits.double() / 0.5).log_softmax(-1), -1, index.unsqueeze(-1)).squeeze(-1)
    assert relative_error(tempered, expected_tempered) <= 1e-5


def test_selective_log_softmax_row_mask():
    logits = random_logits((3, 4, 20), torch.float32).requires_grad_(True)
    index = torch.randint(0, 20, (3, 4), device=DEVICE)
    row_mask = torch.rand(3, 4, device=DEVICE) < 0.5
    index = torch.where(row_mask, index, 10**6)  # masked-out positions are not even checked
    result = prefopt.selective_log_softmax(logits, index, row_mask=row_mask)
    assert (result[~row_mask] == 0).all()
    expected = prefopt.selective_log_softmax(logits, torch.where(row_mask, index, 0))
    assert torch.equal(result[row_mask], expected[row_mask])
    (grad,) = torch.autograd.grad(result.sum(), logits)
    assert (grad[~row_mask] == 0).all()


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, torch.int32, torch.float32])
@pytest.mark.parametrize("top_k", [False, True])
def test_selective_log_softmax_is_trls_drop_in(backend, mask_dtype, top_k):
    """TRL 1.16's semantics: a row_mask of any dtype (its trainers pass the integer completion
    mask; 0 switches a position off), an index [...] or top-K [..., K], float32 out (float64 for
    float64 logits, computed in float64). Masked positions give 0 and exact zero gradients."""
    trl_utils = pytest.importorskip("trl.trainer.utils")
    for dtype in (torch.float32, torch.float64):
        logits = random_logits((2, 5, 23), dtype).requires_grad_(True)
        index = logits.detach().topk(3, dim=-1).indices if top_k else torch.randint(0, 23, (2, 5), device=DEVICE)
        row_mask = (torch.rand(index.shape, device=DEVICE) < 0.6).to(mask_dtype)
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("PREFOPT_BACKEND", backend)
            result = prefopt.selective_log_softmax(logits, index, 0.8, row_mask=row_mask)
        expected = trl_utils.selective_log_softmax(logits.detach().cpu().double(), index.cpu(), 0.8,
                                                   row_mask=row_mask.cpu())
        assert result.dtype == dtype and result.shape == index.shape
        assert relative_error(result, expected) <= (1e-12 if dtype == torch.float64 else 1e-5)
        assert (result[row_mask == 0] == 0).all()
        (grad,) = torch.autograd.grad(result.sum(), logits)
        if not top_k:
            assert (grad[row_mask == 0] == 0).all()
