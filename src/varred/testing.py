"""Public test helpers: hypothesis strategies with closed-form Gaussian expectations.

Importing this module needs ``hypothesis`` (a test dependency); ``varred`` itself
never imports it. Every :func:`smooth_functions` draw has ``fn: [n, d] -> [n]``
built from torch ops only (so ``torch.func.jvp`` works through it) and its exact
expectation under ``ε ~ N(0, I_d)``, so users can check their own control variates:

>>> from hypothesis import given
>>> @given(smooth_functions(3))
... def test_my_cv(sf): ...
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from hypothesis import strategies as st

from varred.errors import VarRedError

__all__ = [
    "SmoothFunction",
    "assert_unbiased",
    "dims",
    "orders",
    "run_distributed",
    "sample_shapes",
    "smooth_functions",
]


def _gauss_moment(k: int) -> float:
    """``E[z^k]`` for ``z ~ N(0, 1)``: ``(k − 1)!!`` for even ``k``, else 0."""
    return 0.0 if k % 2 else float(math.prod(range(k - 1, 0, -2)))


@dataclass(frozen=True)
class _ExpLinear:
    a: tuple[float, ...]
    b: float

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.exp(x @ torch.tensor(self.a, dtype=x.dtype, device=x.device) + self.b)

    def expectation(self) -> float:  # E exp(aᵀε + b) = exp(b + |a|²/2)
        return math.exp(self.b + 0.5 * sum(v * v for v in self.a))


@dataclass(frozen=True)
class _Trig:
    a: tuple[float, ...]
    b: float
    sine: bool

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        u = x @ torch.tensor(self.a, dtype=x.dtype, device=x.device) + self.b
        return torch.sin(u) if self.sine else torch.cos(u)

    def expectation(self) -> float:  # E e^{i(aᵀε+b)} = e^{ib} e^{-|a|²/2}
        damp = math.exp(-0.5 * sum(v * v for v in self.a))
        return (math.sin(self.b) if self.sine else math.cos(self.b)) * damp


@dataclass(frozen=True)
class _Polynomial:
    terms: tuple[tuple[float, tuple[int, ...]], ...]  # (coefficient, indices of the factors)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        for coef, idx in self.terms:
            term = torch.full_like(out, coef)
            for i in idx:
                term = term * x[:, i]
            out = out + term
        return out

    def expectation(self) -> float:
        total = 0.0
        for coef, idx in self.terms:
            total += coef * math.prod(_gauss_moment(idx.count(i)) for i in set(idx))
        return total


@dataclass(frozen=True)
class SmoothFunction:
    """A smooth test function with a closed-form Gaussian expectation.

    Attributes:
        fn: batched ``[n, d] -> [n]`` (torch ops only, jvp-compatible).
        expectation: ``E[fn(ε)]`` for ``ε ~ N(0, I_d)``.
        d: input dimension.
        degree: polynomial degree if ``fn`` is a polynomial, else ``None``.
        description: human-readable formula (shows in hypothesis failures).
    """

    fn: Callable[[torch.Tensor], torch.Tensor]
    expectation: float
    d: int
    degree: int | None
    description: str

    def __repr__(self) -> str:
        return f"SmoothFunction(d={self.d}, {self.description}, E={self.expectation!r})"


@dataclass(frozen=True)
class _Sum:
    parts: tuple[Callable[[torch.Tensor], torch.Tensor], ...]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.parts[0](x)
        for p in self.parts[1:]:
            out = out + p(x)
        return out


def dims(min_dim: int = 1, max_dim: int = 16) -> st.SearchStrategy[int]:
    """Input dimensions ``d`` in ``[min_dim, max_dim]``."""
    return st.integers(min_dim, max_dim)


def orders(max_order: int = 4) -> st.SearchStrategy[int]:
    """Taylor orders ``k`` in ``[0, max_order]``."""
    return st.integers(0, max_order)


def sample_shapes(max_dims: int = 2, max_side: int = 4) -> st.SearchStrategy[tuple[int, ...]]:
    """Per-sample output shapes ``*out`` (possibly ``()``), each side in ``[1, max_side]``."""
    return st.lists(st.integers(1, max_side), max_size=max_dims).map(tuple)


def _small_vector(d: int, norm: float) -> st.SearchStrategy[tuple[float, ...]]:
    """Vectors with entries in ``[-1, 1] · norm / sqrt(d)`` (so ``|a| <= norm``)."""
    scale = norm / math.sqrt(d)
    coord = st.floats(-1.0, 1.0, allow_nan=False).map(lambda v: v * scale)
    return st.lists(coord, min_size=d, max_size=d).map(tuple)


_offsets = st.floats(-1.0, 1.0, allow_nan=False)


@st.composite
def _component(draw: Any, d: int, max_degree: int, polynomial_only: bool) -> Any:
    kind = "poly" if polynomial_only else draw(st.sampled_from(["exp", "sin", "cos", "poly"]))
    if kind == "exp":
        return _ExpLinear(draw(_small_vector(d, 0.5)), draw(_offsets))
    if kind in ("sin", "cos"):
        return _Trig(draw(_small_vector(d, 1.0)), draw(_offsets), kind == "sin")
    n_terms = draw(st.integers(1, 3))
    terms = []
    for _ in range(n_terms):
        coef = draw(st.floats(-1.0, 1.0, allow_nan=False))
        idx = draw(st.lists(st.integers(0, d - 1), max_size=max_degree))
        terms.append((coef, tuple(sorted(idx))))
    return _Polynomial(tuple(terms))


def smooth_functions(
    d: int, *, max_terms: int = 3, max_degree: int = 4, polynomial_only: bool = False
) -> st.SearchStrategy[SmoothFunction]:
    """Sums of ``exp(aᵀε+b)`` (``|a| <= 0.5``), ``sin/cos(aᵀε+b)`` (``|a| <= 1``) and
    polynomials of degree ``<= max_degree``, with exact expectations under ``N(0, I_d)``.

    Args:
        d: input dimension (>= 1).
        max_terms: at most this many components are summed.
        max_degree: highest polynomial degree.
        polynomial_only: draw polynomials only (then ``degree`` is set, so an order-k
            Taylor CV with ``k >= degree`` must remove all variance).
    """
    if isinstance(d, bool) or not isinstance(d, int) or d < 1:
        raise VarRedError(f"d: expected a positive integer, got {d!r}")

    @st.composite
    def build(draw: Any) -> SmoothFunction:
        parts = draw(
            st.lists(_component(d, max_degree, polynomial_only), min_size=1, max_size=max_terms)
        )
        degree = None
        if all(isinstance(p, _Polynomial) for p in parts):
            degree = max((len(i) for p in parts for _, i in p.terms), default=0)
        return SmoothFunction(
            fn=_Sum(tuple(parts)),
            expectation=sum(p.expectation() for p in parts),
            d=d,
            degree=degree,
            description=" + ".join(repr(p) for p in parts),
        )

    return build()


def assert_unbiased(
    sample_fn: Callable[[int], Any],
    truth: float | Sequence[float] | torch.Tensor,
    *,
    repetitions: int,
    z: float = 5.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Check ``|mean − truth| < z·SE`` over independent repetitions of an estimator.

    Args:
        sample_fn: ``sample_fn(r)`` returns the estimate of repetition ``r`` (a tensor
            ``[*out]``, a float, or anything with a ``.mean`` tensor such as
            :class:`varred.Estimate`); repetitions must be independent.
        truth: the exact value, broadcastable to ``[*out]``.
        repetitions: number of repetitions ``R >= 2``.
        z: threshold in standard errors ``SE = std / sqrt(R)``. The tolerance is never
            below 64 ulps of the estimates' dtype (times ``1 + |truth|``), so a zero-variance
            estimator must match ``truth`` up to rounding.

    Returns:
        ``(mean, se)``, each ``[*out]`` float64.

    Raises:
        AssertionError: with the mean, truth, difference and SE of the worst entry.
    """
    if isinstance(repetitions, bool) or not isinstance(repetitions, int) or repetitions < 2:
        raise VarRedError(f"repetitions: expected an integer >= 2, got {repetitions!r}")
    if not z > 0:
        raise VarRedError(f"z: expected a positive threshold, got {z!r}")
    raw = [sample_fn(r) for r in range(repetitions)]
    vals = [
        torch.tensor(float(v), dtype=torch.float64)
        if isinstance(v, (int, float))
        else torch.as_tensor(v if isinstance(v, torch.Tensor) else v.mean).detach()
        for v in raw
    ]
    dtype = vals[0].dtype if vals[0].is_floating_point() else torch.float64
    est = torch.stack([v.to(torch.float64).cpu() for v in vals])  # [R, *out]
    target = torch.as_tensor(truth, dtype=torch.float64).broadcast_to(est.shape[1:])
    mean = est.mean(0)
    se = est.std(0, correction=1) / math.sqrt(repetitions)
    floor = 64 * torch.finfo(dtype).eps * (1 + target.abs())
    diff = (mean - target).abs()
    bad = diff >= torch.maximum(z * se, floor)  # floor: rounding when the spread is ~0
    if bool(bad.any()):
        k = int(torch.argmax(torch.where(bad, diff / se.clamp_min(1e-300), 0.0).flatten()))
        mf, tf, sf = mean.flatten()[k], target.flatten()[k], se.flatten()[k]
        raise AssertionError(
            f"biased estimate at flat index {k} of {list(mean.shape)}: mean {float(mf):.6g}, "
            f"truth {float(tf):.6g}, |Δ| = {float(abs(mf - tf)):.3g} = "
            f"{float(abs(mf - tf) / sf) if sf > 0 else math.inf:.3g} SE (SE {float(sf):.3g}, "
            f"z = {z}, R = {repetitions}); {int(bad.sum())} entries fail"
        )
    return mean, se


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _distributed_entry(
    rank: int, world_size: int, port: int, fn: Callable[..., None], args: tuple[Any, ...]
) -> None:
    import datetime

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
        timeout=datetime.timedelta(seconds=20),
    )  # fmt: skip
    try:
        fn(rank, world_size, *args)
    except BaseException:
        dist.destroy_process_group()
        raise  # the traceback is printed and the rank exits non-zero
    dist.barrier()  # no rank tears down while another still communicates
    dist.destroy_process_group()
    # Skip interpreter finalisation: with gloo, C++ worker threads can still be torn down
    # there and abort the process (SIGABRT, "terminate called without an active exception",
    # ~25% of runs with torch 2.13 on a 2-core machine) after ``fn`` succeeded. Everything
    # ``fn`` wrote is closed by now; flush what is buffered and leave with status 0.
    import os
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_distributed(
    fn: Callable[..., None], world_size: int = 2, *args: Any, timeout: float = 60.0
) -> None:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` processes joined by ``gloo``.

    For testing control variates under ``torch.distributed`` on one CPU machine: the
    default process group is initialised on 127.0.0.1 (a free port) before ``fn`` and
    destroyed after it; processes are spawned (``fn`` must be importable, i.e. defined
    at module level) and killed if they outlive ``timeout`` seconds, so a deadlock
    fails the test instead of hanging it. Results travel through files ``fn`` writes.
    A rank whose ``fn`` returns meets the others at a barrier, destroys the group and
    exits at once with status 0 (interpreter finalisation can abort a gloo process after
    the work is done); a rank whose ``fn`` raises prints its traceback and exits non-zero.

    Raises:
        AssertionError: a process failed, or did not finish within ``timeout``.
    """
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [
        ctx.Process(target=_distributed_entry, args=(r, world_size, port, fn, args))
        for r in range(world_size)
    ]
    for proc in procs:
        proc.start()
    try:
        for proc in procs:
            proc.join(timeout=timeout)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join(5)
    codes = [proc.exitcode for proc in procs]
    assert all(code == 0 for code in codes), f"distributed ranks exited with codes {codes}"
