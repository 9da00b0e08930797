"""Every fused backend against the float64 reference: values and gradients of every statistic."""

import pytest
import torch
from conftest import (
    ALL_STATS,
    DEVICE,
    TOLERANCE,
    random_labels,
    random_logits,
    reference_stats,
    relative_error,
)
from hypothesis import given, settings
from hypothesis import strategies as st

import prefopt
from prefopt.backends import unavailable_reason

DIFFERENTIABLE = ("logps", "entropy", "mean_logits", "log_sum_sq_probs")


def check_against_reference(logits, labels, backend, *, stats=ALL_STATS, inplace_backward=False, **kwargs):
    """Forward and backward of ``backend`` on ``logits`` (a leaf or a view of one) against the
    float64 oracle, with random upstream gradients on every differentiable output."""
    ignore_index = kwargs.get("ignore_index", -100)
    tolerance = TOLERANCE[logits.dtype]
    reference_input = logits.detach().double().cpu().requires_grad_(True)
    reference = reference_stats(reference_input, labels, stats=stats, **kwargs)
    upstream = {name: torch.randn(labels.shape, dtype=torch.float64) for name in DIFFERENTIABLE}
    asked = [name for name in DIFFERENTIABLE if getattr(reference, name) is not None]
    reference_loss = sum((getattr(reference, name) * upstream[name]).sum() for name in asked)
    (reference_grad,) = torch.autograd.grad(reference_loss, reference_input)

    leaf = logits.detach().clone().requires_grad_(True)
    # A non-leaf input, as logits from an LM head are; the in-place gradient lands in its buffer.
    model_logits = leaf * 1 if inplace_backward else leaf
    result = prefopt.token_stats(model_logits, labels, stats=stats, backend=backend,
                                 inplace_backward=inplace_backward, **kwargs)
    for name in asked:
        out = getattr(result, name)
        assert out.dtype == torch.float32 and out.shape == labels.shape, name
        error = relative_error(out.cpu(), getattr(reference, name))
        assert error <= tolerance, f"{name}: relative error {error:.2e} > {tolerance:.0e}"
    if result.is_top1 is not None:
        assert torch.equal(result.is_top1.cpu(), reference.is_top1)
    scored = (labels != ignore_index) if ignore_index is not None else torch.ones_like(labels, dtype=torch.bool)
    assert (result.logps <= 0).all()
    assert (result.logps[~scored] == 0).all()

    loss = sum((getattr(result, name) * upstream[name].to(DEVICE, torch.float32)).sum() for name in asked)
    (grad,) = torch.autograd.grad(loss, model_logits if inplace_backward else leaf)
    assert grad.dtype == logits.dtype and grad.shape == logits.shape
    error = relative_error(grad.cpu(), reference_grad)
    assert error <= tolerance, f"gradient: relative error {error:.2e} > {tolerance:.0e}"
    assert (grad[~scored] == 0).all(), "ignored positions must receive exactly zero gradient"
    return result, grad


@pytest.mark.parametrize("vocab_size", [1, 7, 50257])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_reference(backend, vocab_size, dtype):
    logits = random_logits((2, 3, vocab_size), dtype)
    labels = random_labels((2, 3), vocab_size)
    check_against_reference(logits, labels, backend)


@pytest.mark.parametrize("vocab_size", [128257, 262144])
def test_large_vocabulary(backend, vocab_size):
    logits = random_logits((3, vocab_size), torch.bfloat16)
    labels = random_labels((3,), vocab_size, ignored_fraction=0.0)
    check_against_reference(logits, labels, backend, stats=("entropy",))


def test_strided_view_is_read_in_place(backend):
    """logits[:, :-1] and a transposed view: the kernel reads the view, and agrees."""
    full = random_logits((3, 6, 37), torch.float32)
    labels = random_labels((3, 5), 37)
    check_against_reference(full[:, :-1], labels, backend)
    check_against_reference(full[:, 1:].transpose(0, 1), labels.T.contiguous(), backend)


def test_non_mergeable_leading_dimensions(backend):
    """Three leading dimensions that no two strides can merge: the rows come in several blocks."""
    full = random_logits((2, 4, 5, 11), torch.float32)
    view = full[:, :-1, :-1]
    assert view.stride()[:3] == (220, 55, 11)
    check_against_reference(view, random_labels(view.shape[:-1], 11), backend)


def test_every_row_ignored(backend):
    logits = random_logits((4, 33), torch.float32)
    labels = torch.full((4,), -100, device=DEVICE)
    result, grad = check_against_reference(logits, labels, backend)
    assert (result.entropy == 0).all() and (grad == 0).all()


def test_custom_ignore_index(backend):
    logits = random_logits((5, 19), torch.float32)
    labels = random_labels((5,), 19, ignore_index=3)
    check_against_reference(logits, labels, backend, ignore_index=3)


def test_no_ignore_index_scores_every_position(backend):
    logits = random_logits((4, 13), torch.float32)
    labels = random_labels((4,), 13, ignored_fraction=0.0)
    result, _ = check_against_reference(logits, labels, backend, ignore_index=None)
    assert (result.logps < 0).all()


@pytest.mark.parametrize("temperature", [0.3, 1.7])
@pytest.mark.parametrize("softcap", [None, 2.5, 30.0])
def test_temperature_and_softcap(backend, temperature, softcap):
    logits = random_logits((3, 4, 29), torch.float32)
    labels = random_labels((3, 4), 29)
    check_against_reference(logits, labels, backend, temperature=temperature, softcap=softcap)


@pytest.mark.parametrize(("rows", "vocab_size", "scale", "temperature", "softcap"),
                         [(12, 29, 8.0, 0.3, 30.0), (1, 2, 4.0, 1.0, None), (1, 3, 4.0, 1.0, None)])
def test_peaked_rows_keep_relative_precision(backend, rows, vocab_size, scale, temperature, softcap):
    """With p_max ~ 1, log p of the argmax, the entropy and log sum p^2 are all tiny. The fused
    paths keep them to 1e-5 relative (float32 PyTorch, forming 1 + tiny, loses them entirely
    at V = 2)."""
    generator = torch.Generator().manual_seed(0)
    kwargs = {"stats": ("entropy", "log_sum_sq_probs"), "temperature": temperature, "softcap": softcap}
    for _ in range(30):
        logits = random_logits((rows, vocab_size), torch.float32, scale=scale, generator=generator)
        labels = random_labels((rows,), vocab_size, ignored_fraction=0.0, generator=generator)
        exact = reference_stats(logits, labels, **kwargs)
        fused = prefopt.token_stats(logits, labels, backend=backend, **kwargs)
        for name in ("logps", "entropy", "log_sum_sq_probs"):
            error = relative_error(getattr(fused, name).cpu(), getattr(exact, name))
            assert error <= 1e-5, (name, error)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_backward_gives_the_same_gradient(backend, dtype):
    logits = random_logits((3, 5, 41), dtype)
    labels = random_labels((3, 5), 41)
    check_against_reference(logits, labels, backend, inplace_backward=True)
    upstream = torch.randn(2, 3, 5, device=DEVICE)
    gradients = []
    for inplace_backward in (False, True):
        model_logits = logits.clone().requires_grad_(True) * 1
        logps, entropy = prefopt.token_logprobs(model_logits, labels, return_entropy=True,
                                                backend=backend, inplace_backward=inplace_backward)
        (grad,) = torch.autograd.grad((logps * upstream[0] + entropy * upstream[1]).sum(), model_logits)
        gradients.append(grad)
    assert torch.equal(*gradients)


@pytest.mark.parametrize(("inplace_backward", "softcap"), [(False, None), (True, 30.0)])
def test_labels_on_the_edges_of_the_backward_blocks(backend, inplace_backward, softcap):
    """The label's one-hot term is written apart from the rest of its block (Triton: 8192 columns a
    program), over the block's own store and, in place, over the logit it was computed from: labels
    on both sides of a block boundary, on a block's first column and on the row's last."""
    block = 8192
    vocab_size = 3 * block + 5
    labels = torch.tensor([block - 1, block, 3 * block, vocab_size - 1], device=DEVICE)
    logits = random_logits((len(labels), vocab_size), torch.float32)
    check_against_reference(logits, labels, backend, stats=("entropy",), inplace_backward=inplace_backward,
                            softcap=softcap)


def test_inplace_backward_writes_into_the_logits_buffer(backend):
    leaf = random_logits((2, 3, 17), torch.float32).requires_grad_(True)
    logits = leaf * 1
    labels = random_labels((2, 3), 17)
    logps = prefopt.token_logprobs(logits, labels, backend=backend, inplace_backward=True)
    (grad,) = torch.autograd.grad(logps.sum(), logits)
    assert grad.data_ptr() == logits.data_ptr()


def test_inplace_backward_on_a_strided_view(backend):
    full = random_logits((2, 5, 23), torch.float32)
    labels = random_labels((2, 4), 23)
    check_against_reference(full[:, :-1], labels, backend, inplace_backward=True)


def test_only_some_statistics(backend):
    logits = random_logits((6, 21), torch.float32)
    labels = random_labels((6,), 21)
    for stats in [(), ("entropy",), ("is_top1",), ("mean_logits", "log_sum_sq_probs")]:
        result, _ = check_against_reference(logits, labels, backend, stats=stats)
        for name in ALL_STATS:
            assert (getattr(result, name) is None) == (name not in stats)


def test_gradient_of_entropy_alone(backend):
    """An unused log-prob output gets no upstream gradient; entropy's must still flow."""
    leaf = random_logits((4, 15), torch.float32).requires_grad_(True)
    labels = random_labels((4,), 15)
    _, entropy = prefopt.token_logprobs(leaf, labels, return_entropy=True, backend=backend)
    (grad,) = torch.autograd.grad(entropy.sum(), leaf)
    reference_input = leaf.detach().double().requires_grad_(True)
    _, reference = prefopt.token_logprobs(reference_input, labels, return_entropy=True, backend="reference")
    (expected,) = torch.autograd.grad(reference.sum(), reference_input)
    assert relative_error(grad, expected) <= 1e-5


def test_is_top1_ties_go_to_the_earlier_token(backend):
    logits = torch.zeros(3, 9, device=DEVICE)
    logits[:, 2] = 5.0
    logits[:, 6] = 5.0
    labels = torch.tensor([2, 6, 0], device=DEVICE)
    result = prefopt.token_stats(logits, labels, stats=("is_top1",), backend=backend)
    assert result.is_top1.tolist() == [True, False, False]


def test_rows_cut_into_vocabulary_slices(backend):
    """Few rows of a large vocabulary: Triton cuts each row into slices of 16384 columns or more, one
    program each, merged in order (the CUDA kernel has its own split). Ties of the maximum in two
    slices (is_top1 takes the earlier), a peaked row, a slice of -inf and an ignored row."""
    slice_columns = 16384
    vocab_size = 5 * slice_columns + 3
    logits = random_logits((5, vocab_size), torch.float32)
    logits[0, [slice_columns + 7, 3 * slice_columns + 1]] = 40.0
    logits[1, 4 * slice_columns + 2] = 30.0
    logits[2, slice_columns:3 * slice_columns] = float("-inf")
    labels = torch.tensor([slice_columns + 7, 4 * slice_columns + 2, 5, -100, vocab_size - 1], device=DEVICE)
    # The mean logit of the -inf row is -inf, which a relative error cannot compare: apart below.
    result, _ = check_against_reference(logits, labels, backend, stats=[s for s in ALL_STATS if s != "mean_logits"])
    mean = prefopt.token_stats(logits, labels, stats=("mean_logits",), backend=backend).mean_logits.cpu()
    expected = reference_stats(logits.double().cpu(), labels.cpu(), stats=("mean_logits",)).mean_logits
    finite = torch.tensor([0, 1, 3, 4])
    assert relative_error(mean[finite], expected[finite]) <= TOLERANCE[torch.float32]
    assert mean[2] == float("-inf")
    labels[0] = 3 * slice_columns + 1
    late_tie = prefopt.token_stats(logits, labels, stats=("is_top1",), backend=backend).is_top1
    assert result.is_top1[0] and not late_tie[0]


def test_minus_infinity_logits_are_masked_vocabulary(backend):
    """-inf logits (a masked vocabulary) have probability 0 and leave the softmax statistics and
    the gradient finite (the mean logit is -inf, as it should be)."""
    logits = random_logits((3, 20000), torch.float32)
    logits[:, 1:9000] = float("-inf")
    labels = torch.tensor([0, 9000, 19999], device=DEVICE)
    result, grad = check_against_reference(logits, labels, backend, stats=("entropy", "log_sum_sq_probs", "is_top1"))
    assert torch.isfinite(result.entropy).all() and torch.isfinite(grad).all()


def test_log_probs_never_positive_on_peaked_rows(backend):
    logits = random_logits((8, 64), torch.bfloat16)
    labels = torch.randint(0, 64, (8,), device=DEVICE)
    logits[torch.arange(8), labels] = 1e4
    logps = prefopt.token_logprobs(logits, labels, backend=backend, softcap=None)
    assert (logps <= 0).all()


def test_deterministic(backend):
    logits = random_logits((4, 6, 300), torch.bfloat16)
    labels = random_labels((4, 6), 300)
    runs = []
    for _ in range(2):
        leaf = logits.clone().requires_grad_(True)
        result = prefopt.token_stats(leaf, labels, stats=ALL_STATS, backend=backend)
        (grad,) = torch.autograd.grad(result.logps.sum() + result.entropy.sum(), leaf)
        runs.append((*[t for t in result if t is not None], grad))
    for first, second in zip(*runs):
        assert torch.equal(first, second)


def test_empty_batch(backend):
    logits = random_logits((0, 5, 11), torch.float32).requires_grad_(True)
    labels = torch.zeros((0, 5), dtype=torch.long, device=DEVICE)
    logps = prefopt.token_logprobs(logits, labels, backend=backend)
    assert logps.shape == (0, 5)
    (grad,) = torch.autograd.grad(logps.sum(), logits)
    assert grad.shape == logits.shape


def test_int32_labels(backend):
    logits = random_logits((3, 7, 10), torch.float32)
    labels = random_labels((3, 7), 10).int()
    check_against_reference(logits, labels, backend)


@settings(max_examples=25, deadline=None)
@given(
    leading=st.lists(st.integers(0, 5), min_size=0, max_size=3),
    vocab_size=st.integers(1, 3000),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    ignored_fraction=st.sampled_from([0.0, 0.5, 1.0]),
    drop_last_position=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_shapes(leading, vocab_size, dtype, ignored_fraction, drop_last_position, seed):
    generator = torch.Generator().manual_seed(seed)
    shape = (*leading, vocab_size)
    if drop_last_position and leading:
        shape = (*leading[:-1], leading[-1] + 1, vocab_size)
    logits = random_logits(shape, dtype, generator=generator)
    if drop_last_position and leading:
        logits = logits[..., :-1, :]
    labels = random_labels(logits.shape[:-1], vocab_size, ignored_fraction, generator=generator)
    # Hypothesis runs without fixtures: the backends that run here as they are (not "cuda-sim").
    for backend in ("triton", "cuda", "torch"):
        if unavailable_reason(backend, DEVICE) is None:
            check_against_reference(logits, labels, backend)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(4, 4096, 128256), (2, 4096, 262144)])
def test_gpu_full_size_and_64_bit_offsets(backend, shape):
    """Rows x V past 2^31 elements: every offset must be 64-bit. Compared on sampled rows."""
    if backend == "torch":
        pytest.skip("the chunked fallback indexes through PyTorch, whose offsets are 64-bit already")
    torch.manual_seed(0)
    logits = torch.randn(shape, device="cuda", dtype=torch.bfloat16) * 4
    labels = torch.randint(0, shape[-1], shape[:-1], device="cuda")
    assert logits.numel() > 2**31
    logits.requires_grad_(True)
    logps, entropy = prefopt.token_logprobs(logits, labels, return_entropy=True, backend=backend)
    (grad,) = torch.autograd.grad(logps.sum(), logits)
    rows = [(0, 0), (shape[0] - 1, shape[1] - 1), (shape[0] // 2, 17)]
    for b, t in rows:
        x = logits[b, t].detach().double().requires_grad_(True)
        expected = torch.log_softmax(x, -1)[labels[b, t]]
        (expected_grad,) = torch.autograd.grad(expected, x)
        assert abs(logps[b, t].item() - expected.item()) <= 1e-4 * abs(expected.item()) + 1e-5
        assert relative_error(grad[b, t], expected_grad) <= 1e-2


NON_BOOL_STATS = ("logps", "entropy", "mean_logits", "log_sum_sq_probs")


def stats_of_every_backend(logits, labels, backend, **kwargs):
    """(the backend's TokenStats, the reference's) with every statistic asked for."""
    return (prefopt.token_stats(logits, labels, stats=ALL_STATS, backend=backend, **kwargs),
            prefopt.token_stats(logits.cpu(), labels.cpu(), stats=ALL_STATS, backend="reference", **kwargs))


@pytest.mark.parametrize("nan_column", [1, 3])
def test_nan_in_a_scored_row_gives_nan_in_that_row_only(backend, nan_column):
    """A NaN logit anywhere in a scored row (the label's column or another) makes that row's
    log-prob and statistics NaN on every backend; the other rows are what they are without it."""
    clean = random_logits((4, 37), torch.float32)
    labels = torch.tensor([0, 3, 5, -100], device=DEVICE)
    poisoned = clean.clone()
    poisoned[1, nan_column] = float("nan")
    poisoned[3, 2] = float("nan")  # an ignored row: never read
    for result in stats_of_every_backend(poisoned, labels, backend):
        expected = prefopt.token_stats(clean.cpu(), labels.cpu(), stats=ALL_STATS, backend="reference")
        for name in NON_BOOL_STATS:
            value = getattr(result, name).cpu()
            assert torch.isnan(value[1]), name
            assert not torch.isnan(value[[0, 2, 3]]).any(), name
            assert relative_error(value[[0, 2, 3]], getattr(expected, name)[[0, 2, 3]]) <= 1e-5, name
            assert value[3] == 0, name
    chosen = prefopt.sequence_logprobs(poisoned.view(2, 2, 37), labels.view(2, 2), backend=backend)
    loss = prefopt.dpo_loss(chosen[:1], chosen[1:], torch.zeros(1, device=DEVICE), torch.zeros(1, device=DEVICE))
    assert torch.isnan(loss.loss)


def test_a_scored_row_with_no_finite_logit_is_nan_everywhere(backend):
    """A scored row of only -inf logits has no distribution: its log-prob, entropy and log sum p^2
    are NaN on every backend (never 0, which reads as probability 1); its mean logit is the plain
    mean, -inf. Rows holding some -inf logits are ordinary rows."""
    logits = random_logits((3, 9), torch.float32)
    logits[1] = float("-inf")
    logits[2, :4] = float("-inf")
    labels = torch.tensor([2, 4, 6], device=DEVICE)
    for result in stats_of_every_backend(logits, labels, backend):
        for name in ("logps", "entropy", "log_sum_sq_probs"):
            value = getattr(result, name).cpu()
            assert torch.isnan(value[1]), name
            assert torch.isfinite(value[[0, 2]]).all(), name
        assert result.mean_logits[1] == float("-inf")


@pytest.mark.parametrize("softcap", [None, 20.0])
def test_ignored_rows_holding_nan_or_inf_get_exact_zero_gradients(backend, softcap):
    """An ignored row is never read, whatever it holds: its outputs and gradients are exact zeros
    on every backend, the reference included, for every differentiable statistic."""
    logits = random_logits((4, 11), torch.float32)
    logits[1, 3] = float("nan")
    logits[2] = float("inf")
    logits[3, 0] = float("-inf")
    labels = torch.tensor([4, -100, -100, -100], device=DEVICE)
    for name in (backend, "reference"):
        leaf = logits.clone().requires_grad_(True)
        result = prefopt.token_stats(leaf, labels, stats=ALL_STATS, softcap=softcap, backend=name)
        loss = sum(getattr(result, stat).sum() for stat in NON_BOOL_STATS)
        (grad,) = torch.autograd.grad(loss, leaf)
        assert torch.isfinite(grad[0]).all(), name
        assert (grad[1:] == 0).all(), name
        for stat in NON_BOOL_STATS:
            assert (getattr(result, stat)[1:] == 0).all(), (name, stat)


def test_inplace_backward_refuses_rows_that_share_memory(backend):
    """An in-place gradient into rows that share memory (an expanded view, stride 0) would be
    wrong with no error: it is refused from the strides before any kernel runs, naming logits.
    Disjoint views (a sliced sequence, a transposed batch) are accepted and exact."""
    base = random_logits((1, 3, 13), torch.float32).requires_grad_(True)
    labels = random_labels((4, 3), 13)
    for shared in (base * 1).expand(4, 3, 13), (base * 1)[:, :1].expand(1, 3, 13):
        with pytest.raises(ValueError, match=r"^logits: inplace_backward=True .*strides"):
            prefopt.token_logprobs(shared, labels[: shared.shape[0]], inplace_backward=True, backend=backend)
    full = random_logits((5, 4, 13), torch.float32)
    check_against_reference(full[:, :-1].transpose(0, 1), random_labels((3, 5), 13), backend, inplace_backward=True)
