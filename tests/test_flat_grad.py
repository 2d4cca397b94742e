"""Tests of varred.flat_grad: flat buffers, batched vs loop, and which errors fall back (defect 17)."""

from __future__ import annotations

import pytest
import torch

from varred.errors import VarRedError
from varred.flat_grad import flat_grad, flat_grad_rows, is_vmap_unsupported

F64 = torch.float64


class Plain(torch.autograd.Function):
    """Identity whose backward has data-dependent control flow: vmap cannot batch it."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g if bool(torch.isfinite(g).all()) else g * 0


class OutOfMemory(torch.autograd.Function):
    """Identity whose backward runs out of memory."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


def _setup(generator):
    w = torch.nn.Parameter(torch.randn(3, 2, generator=generator, dtype=F64))
    unused = torch.nn.Parameter(torch.ones(4, dtype=F64))
    x = torch.randn(5, 3, generator=generator, dtype=F64)
    return [w, unused], x


def test_rows_equal_per_sample_loop_and_unused_are_zero(generator):
    params, x = _setup(generator)
    out = ((x @ params[0]) ** 2).sum(1)  # [B]
    eye = torch.eye(5, dtype=F64)
    batched, used = flat_grad_rows(out, params, eye, mode="batched", retain_graph=True)
    looped, used_loop = flat_grad_rows(out, params, eye, mode="loop", retain_graph=True)
    assert used and not used_loop and batched.shape == (5, 10)
    torch.testing.assert_close(batched, looped, rtol=1e-14, atol=0)
    assert torch.equal(batched[:, 6:], torch.zeros(5, 4, dtype=F64))
    want = flat_grad(out[2], params)
    torch.testing.assert_close(batched[2], want, rtol=1e-14, atol=0)


def test_auto_falls_back_only_on_a_missing_batching_rule(generator):
    params, x = _setup(generator)
    out = Plain.apply(((x @ params[0]) ** 2).sum(1))
    eye = torch.eye(5, dtype=F64)
    rows, used = flat_grad_rows(out, params, eye, mode="auto")
    assert not used
    ref = ((x @ params[0]) ** 2).sum(1)
    torch.testing.assert_close(rows, flat_grad_rows(ref, params, eye)[0], rtol=1e-14, atol=0)


def test_out_of_memory_is_never_swallowed(generator):
    params, x = _setup(generator)
    out = OutOfMemory.apply(((x @ params[0]) ** 2).sum(1))
    with pytest.raises(torch.OutOfMemoryError):
        flat_grad_rows(out, params, torch.eye(5, dtype=F64), mode="auto")


def test_error_classification():
    assert is_vmap_unsupported(RuntimeError("Batching rule not implemented for aten::foo"))
    assert is_vmap_unsupported(RuntimeError("vmap: It looks like you're calling .item()"))
    assert not is_vmap_unsupported(torch.OutOfMemoryError("CUDA out of memory"))
    assert not is_vmap_unsupported(RuntimeError("CUDA error: an illegal memory access (batched)"))
    assert not is_vmap_unsupported(RuntimeError("element 0 of tensors does not require grad"))
    assert not is_vmap_unsupported(ValueError("vmap"))


def test_errors(generator):
    params, x = _setup(generator)
    out = (x @ params[0]).sum(1)
    with pytest.raises(VarRedError, match="mode: expected one of"):
        flat_grad_rows(out, params, torch.eye(5, dtype=F64), mode="vmap")
    with pytest.raises(VarRedError, match="losses: expected values that depend on params"):
        flat_grad(out, params[1:], name="losses")
