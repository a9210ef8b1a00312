"""The fused, chunked head projection + cross-entropy (stackwise.model.head_loss) against the plain
logits → F.cross_entropy path: same loss and same gradients."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from stackwise.model import head_loss as fused_loss
from stackwise.model.head_loss import chunk_rows, linear_cross_entropy_sum

N, D, V = 300, 16, 64


@pytest.fixture(autouse=True)
def _small_chunks(monkeypatch):
    # 64 rows per chunk at V=64: 300 rows make 5 chunks, the last one short
    monkeypatch.setattr(fused_loss, "CPU_CHUNK_BYTES", 64 * 4 * V)
    torch.manual_seed(0)


def reference(hidden, head, labels, weights=None):
    ce = F.cross_entropy(head(hidden).float(), labels, reduction="none")
    return (ce if weights is None else ce * weights).sum()


def grads_of(fn, hidden, head, *args):
    hidden = hidden.detach().clone().requires_grad_(hidden.requires_grad)
    head.zero_grad(set_to_none=True)
    total = fn(hidden, head, *args)
    (total / 7.0).backward()  # a scale, as the machine divides by the target count
    return total.detach(), hidden.grad, head.weight.grad


def test_chunking_covers_every_row():
    assert chunk_rows(V, torch.device("cpu"), N) == 64
    assert chunk_rows(10**6, torch.device("cpu"), N) == 16  # never fewer than 16 rows
    assert chunk_rows(V, torch.device("cpu"), 10) == 10
    assert chunk_rows(V, torch.device("cpu"), 0) == 1  # no loss positions: the loop runs zero times


@pytest.mark.parametrize("weighted", [False, True])
def test_loss_and_gradients_equal_the_plain_path(weighted):
    hidden = torch.randn(N, D, requires_grad=True)
    head = nn.Linear(D, V, bias=False)
    labels = torch.randint(0, V, (N,))
    weights = torch.rand(N) * 3 if weighted else None
    ours = grads_of(linear_cross_entropy_sum, hidden, head, labels, weights)
    plain = grads_of(reference, hidden, head, labels, weights)
    for a, b in zip(ours, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_frozen_head_and_no_grad():
    hidden = torch.randn(N, D, requires_grad=True)
    head = nn.Linear(D, V, bias=False).requires_grad_(False)
    labels = torch.randint(0, V, (N,))
    _, grad_h, grad_w = grads_of(linear_cross_entropy_sum, hidden, head, labels)
    assert grad_w is None
    torch.testing.assert_close(grad_h, grads_of(reference, hidden, head, labels)[1], rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy_sum(hidden, head, labels), reference(hidden, head, labels))


def test_one_backward_pass_then_a_clear_error():
    hidden = torch.randn(N, D, requires_grad=True)
    head = nn.Linear(D, V, bias=False)
    labels = torch.randint(0, V, (N,))
    total = linear_cross_entropy_sum(hidden, head, labels)
    total.backward(retain_graph=True)
    first = head.weight.grad.clone()
    with pytest.raises(RuntimeError, match=r"one backward pass.*F\.cross_entropy"):
        total.backward()
    assert torch.equal(head.weight.grad, first)  # nothing was added by the refused pass


def test_tied_weight_gathers_both_gradients():
    embedding = nn.Embedding(V, D)
    head = nn.Linear(D, V, bias=False)
    head.weight = embedding.weight
    ids, labels = torch.randint(0, V, (N,)), torch.randint(0, V, (N,))
    grads = []
    for fn in (linear_cross_entropy_sum, reference):
        embedding.zero_grad(set_to_none=True)
        fn(torch.tanh(embedding(ids)), head, labels).backward()
        grads.append(embedding.weight.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)


def test_bf16_autocast_is_as_accurate_as_autocast_linear():
    hidden = torch.randn(N, D, requires_grad=True)
    head = nn.Linear(D, V, bias=False)
    labels = torch.randint(0, V, (N,))
    exact = grads_of(reference, hidden, head, labels)  # fp32 throughout
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = grads_of(linear_cross_entropy_sum, hidden, head, labels)
        plain = grads_of(reference, hidden, head, labels)
    assert ours[1].dtype == hidden.dtype and ours[2].dtype == head.weight.dtype
    for a, b, truth in zip(ours, plain, exact, strict=True):
        torch.testing.assert_close(a, truth, rtol=3e-2, atol=3e-3)  # bf16 products
        assert (a - truth).abs().max() <= 1.5 * (b - truth).abs().max() + 1e-6


def test_a_head_with_bias_takes_the_plain_path():
    hidden = torch.randn(N, D, requires_grad=True)
    head = nn.Linear(D, V, bias=True)
    labels = torch.randint(0, V, (N,))
    ours = grads_of(linear_cross_entropy_sum, hidden, head, labels)
    plain = grads_of(reference, hidden, head, labels)
    for a, b in zip(ours, plain, strict=True):
        torch.testing.assert_close(a, b)


def test_model_loss_equals_cross_entropy_of_its_logits():
    from stackwise.config import StackWiseConfig
    from stackwise.framework import build_model

    config = StackWiseConfig.from_dict({
        "model": {"d_model": 32, "n_heads": 4, "max_seq_len": 32, "vocab_size": V,
                  "architecture": {"n_stacks": 2, "blocks_per_stack": 1}},
        "training": {"batch_size": 4, "seq_len": 32}, "data": {}})
    model = build_model(config)
    ids, labels = torch.randint(0, V, (4, 32)), torch.randint(0, V, (4, 32))
    ours = model.loss(ids, labels)
    plain = F.cross_entropy(model(ids).flatten(0, 1), labels.flatten())
    torch.testing.assert_close(ours, plain)
    grads = torch.autograd.grad(ours, list(model.parameters()))
    for a, b in zip(grads, torch.autograd.grad(plain, list(model.parameters())), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
