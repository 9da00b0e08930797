"""Bad input raises a ValueError/TypeError naming the argument, before any kernel runs."""

import pytest
import torch
from conftest import DEVICE

import prefopt


def good_inputs(vocab_size: int = 11):
    return torch.randn(2, 3, vocab_size, device=DEVICE), torch.randint(0, vocab_size, (2, 3), device=DEVICE)


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("bad_label", [11, -1, -101, 10**9])
def test_label_out_of_range(backend, bad_label):
    """On CPU the range check is a plain one (on a GPU it is an asynchronous device assertion)."""
    logits, labels = good_inputs()
    labels[1, 2] = bad_label
    with pytest.raises(ValueError, match=r"labels: every label must be in \[0, 11\) .* found"):
        prefopt.token_logprobs(logits.cpu(), labels.cpu(), backend=backend)


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
@pytest.mark.parametrize("function", ["token_logprobs", "linear_token_logprobs"])
def test_label_out_of_range_under_torch_compile_on_cpu(compiler, function):
    """A compiled call on CPU raises eager's ValueError, not the RuntimeError of an assertion."""
    logits, labels = good_inputs()
    labels[0, 1] = 11
    weight = torch.randn(11, 5)
    calls = {"token_logprobs": lambda: prefopt.token_logprobs(logits.cpu(), labels.cpu(), backend="torch"),
             "linear_token_logprobs": lambda: prefopt.linear_token_logprobs(torch.randn(2, 3, 5), weight,
                                                                            labels.cpu(), backend="torch")}
    torch._dynamo.reset()
    compiled = torch.compile(calls[function], backend=compiler, fullgraph=True)
    with pytest.raises(ValueError, match=r"labels: every label must be in \[0, 11\) .* found 11 \(1 such\)"):
        compiled()


@pytest.mark.parametrize("ignore_index", [2**63, -(2**63) - 1, 2**70])
def test_ignore_index_outside_int64(ignore_index):
    logits, labels = good_inputs()
    with pytest.raises(ValueError, match=r"^ignore_index: expected a 64-bit integer"):
        prefopt.token_logprobs(logits, labels, ignore_index=ignore_index)
    with pytest.raises(ValueError, match=r"^ignore_index: expected a 64-bit integer"):
        prefopt.linear_token_logprobs(torch.randn(2, 3, 5, device=DEVICE), torch.randn(11, 5, device=DEVICE),
                                      labels, ignore_index=ignore_index)


def test_label_equal_to_ignore_index_is_fine():
    logits, labels = good_inputs()
    labels[0, 0] = 99
    assert prefopt.token_logprobs(logits, labels, ignore_index=99)[0, 0] == 0


def test_no_ignore_index_rejects_minus_100():
    logits, labels = good_inputs()
    labels[0, 0] = -100
    with pytest.raises(ValueError, match="labels"):
        prefopt.token_logprobs(logits.cpu(), labels.cpu(), ignore_index=None)


def test_labels_shape_mismatch():
    logits, labels = good_inputs()
    with pytest.raises(ValueError, match=r"labels: expected shape \(2, 3\)"):
        prefopt.token_logprobs(logits, labels[:, :2])


def test_integer_logits():
    _, labels = good_inputs()
    with pytest.raises(TypeError, match="logits: expected a floating-point tensor"):
        prefopt.token_logprobs(torch.randint(0, 5, (2, 3, 11), device=DEVICE), labels)


def test_float_labels():
    logits, labels = good_inputs()
    with pytest.raises(TypeError, match="labels: expected an int64 or int32 tensor"):
        prefopt.token_logprobs(logits, labels.float())


def test_non_contiguous_last_dimension():
    logits, labels = good_inputs()
    transposed = logits.transpose(-1, -2).contiguous().transpose(-1, -2)
    with pytest.raises(ValueError, match="logits: the last .* dimension must be contiguous"):
        prefopt.token_logprobs(transposed, labels)


def test_mismatched_devices():
    logits, labels = good_inputs()
    with pytest.raises(ValueError, match="labels: expected a tensor on"):
        prefopt.token_logprobs(logits.to("meta"), labels)


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), float("inf")])
def test_temperature_not_positive(temperature):
    logits, labels = good_inputs()
    with pytest.raises(ValueError, match="temperature: expected a finite value > 0"):
        prefopt.token_logprobs(logits, labels, temperature=temperature)


def test_temperature_not_a_number():
    logits, labels = good_inputs()
    with pytest.raises(TypeError, match="temperature"):
        prefopt.token_logprobs(logits, labels, temperature=torch.tensor(1.0))


@pytest.mark.parametrize("softcap", [0.0, -3.0])
def test_softcap_not_positive(softcap):
    logits, labels = good_inputs()
    with pytest.raises(ValueError, match="softcap"):
        prefopt.token_logprobs(logits, labels, softcap=softcap)


def test_empty_vocabulary():
    with pytest.raises(ValueError, match="logits: the vocabulary dimension is empty"):
        prefopt.token_logprobs(torch.randn(2, 0, device=DEVICE), torch.zeros(2, dtype=torch.long, device=DEVICE))


def test_unknown_statistic():
    logits, labels = good_inputs()
    with pytest.raises(ValueError, match="stats: unknown statistic"):
        prefopt.token_stats(logits, labels, stats=("entropy", "perplexity"))
    with pytest.raises(TypeError, match="stats"):
        prefopt.token_stats(logits, labels, stats="entropy")


def test_unknown_backend():
    logits, labels = good_inputs()
    with pytest.raises(ValueError, match="backend: expected one of"):
        prefopt.token_logprobs(logits, labels, backend="cutlass")


def test_cu_seqlens_checks():
    logits = torch.randn(10, 7, device=DEVICE)
    labels = torch.randint(0, 7, (10,), device=DEVICE)
    cases = [
        (torch.tensor([0, 4, 9], device=DEVICE), ValueError, "cu_seqlens: expected non-decreasing offsets"),
        (torch.tensor([0, 6, 4, 10], device=DEVICE), ValueError, "cu_seqlens: expected non-decreasing offsets"),
        (torch.tensor([1, 10], device=DEVICE), ValueError, "cu_seqlens: expected non-decreasing offsets"),
        (torch.tensor([0.0, 10.0], device=DEVICE), TypeError, "cu_seqlens: expected an int32 or int64"),
        (torch.tensor([[0, 10]], device=DEVICE), ValueError, r"cu_seqlens: expected shape \[S \+ 1\]"),
    ]
    for cu_seqlens, error, message in cases:
        with pytest.raises(error, match=message):
            prefopt.sequence_logprobs(logits.cpu(), labels.cpu(), cu_seqlens=cu_seqlens.cpu())
    with pytest.raises(ValueError, match="logits: with cu_seqlens, expected one packed row"):
        prefopt.sequence_logprobs(logits.view(2, 5, 7), labels.view(2, 5), cu_seqlens=torch.tensor([0, 10]))


def test_row_mask_checks():
    logits, labels = good_inputs()
    with pytest.raises(TypeError, match="row_mask: expected a torch.Tensor or None"):
        prefopt.selective_log_softmax(logits, labels, row_mask=[[1, 1, 1], [1, 1, 1]])
    with pytest.raises(ValueError, match="row_mask: expected shape"):
        prefopt.selective_log_softmax(logits, labels, row_mask=torch.ones(3, dtype=torch.bool, device=DEVICE))
