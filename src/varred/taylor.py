"""Taylor control variates of order k under a Gaussian base, by nested forward-mode AD.

``T^k f̃(ε) = Σ_{j≤k} D^j f̃(0)[ε^{⊗j}] / j!`` for ``f̃(ε) = f(μ + L ε)``, ``ε ~ N(0, I_d)``,
and the control ``c_k(ε) = T^k f̃(ε) − E[T^k f̃]`` (Jeha et al. 2024, the Taylor CV;
Owen, *Monte Carlo theory*, ch. 8 for control variates). Odd orders have mean zero;
even orders ``j = 2m`` have mean ``(j − 1)!! Δ^m f̃(0)`` (Isserlis 1918). See
``docs/taylor.md`` for the routes to that mean and their cost. The derivatives themselves
are in :mod:`varred.derivatives` (``taylor_terms`` and ``iterated_laplacian`` are re-exported
here).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch

from varred.derivatives import iterated_laplacian, laplacian_rows, sum_scaled, taylor_terms
from varred.errors import VarRedError, check_finite, check_floating, check_order, shape_str
from varred.gaussian import cubature_size, gauss_hermite_cubature
from varred.vocabulary import MeanMethod, ProbeDistribution

__all__ = ["TaylorCV", "iterated_laplacian", "taylor_terms"]

Fn = Callable[[torch.Tensor], torch.Tensor]
EXPECTATIONS = (MeanMethod.EXACT.value, MeanMethod.PROBE.value)
PROBES = tuple(p.value for p in ProbeDistribution)
EXACT_METHODS = ("auto", "cubature", "laplacian")


def _count(n: int) -> str:
    """A row count for a message: exact up to 10¹², then ``≈ 1.2e+374``-style."""
    if n < 10**12:
        return str(n)
    digits = len(str(n))
    return f"≈ {int(str(n)[:2]) / 10:.1f}e+{digits - 1:d}"


class TaylorCV:
    r"""Order-k Taylor control variate of ``f`` under ``x = μ + L ε``, ``ε ~ N(0, I_d)``.

    ``cv(ε) = T^k f̃(ε) − E[T^k f̃]`` with ``f̃(ε) = f(μ + L ε)``; ``E[cv] = 0`` exactly
    (``mean_method="exact"``) or in expectation over independent probes
    (``"probe"``: per sample ``i`` the even orders' mean is replaced by
    ``mean_p Σ_{even j≥2} D^j f̃(0)[ε'^j_{ip}] / j!``, unbiased and independent of
    ``ε_i``). Jeha, Grathwohl, Andersen, Ek & Frellsen (2024).

    Args:
        f: batched function ``[n, d] -> [n, *out]``, rows independent, differentiable in its input.
        order: ``k ≥ 0``.
        mean: ``μ`` ``[d]`` (zero when ``None``).
        scale_tril: ``L`` ``[d, d]``, covariance ``L Lᵀ`` (identity when ``None``).
        mean_method: how the control's mean is computed: ``"exact"`` (Isserlis means, small d)
            or ``"probe"`` (any d). (Named ``expectation`` before; that keyword still works,
            with a ``DeprecationWarning``: it clashed with the method :meth:`expectation`.)
        num_probes: probes per sample ``P ≥ 1`` for ``"probe"``.
        probe_distribution: ``"gaussian"`` or ``"rademacher"`` (only for ``order ≤ 3``).
        exact_method: ``"auto"`` (cheapest), ``"cubature"`` or ``"laplacian"``.
        max_evaluations: largest number of rows the exact route may evaluate.
        chunk_size: rows per call of ``f`` in the Laplacian route.

    >>> cv = TaylorCV(lambda x: torch.exp(x.sum(1)), order=2)
    >>> eps = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    >>> cv(eps).shape, float(cv.expectation(d=3))  # 1 + d / 2
    (torch.Size([5]), 2.5)
    """

    def __init__(
        self,
        f: Fn,
        order: int,
        *,
        mean: torch.Tensor | None = None,
        scale_tril: torch.Tensor | None = None,
        mean_method: str = "exact",
        num_probes: int = 1,
        probe_distribution: str = "gaussian",
        exact_method: str = "auto",
        max_evaluations: int = 50_000,
        chunk_size: int | None = 4096,
        expectation: str | None = None,
    ) -> None:
        if expectation is not None:  # the old name, clashing with the method expectation()
            warnings.warn(
                "TaylorCV(expectation=...) is deprecated; use mean_method=...",
                DeprecationWarning,
                stacklevel=2,
            )
            mean_method = expectation
        arg = "expectation" if expectation is not None else "mean_method"
        expectation = mean_method
        if not callable(f):
            raise VarRedError(f"f: expected a callable [n, d] -> [n, ...], got {type(f).__name__}")
        self.f = f
        self.order = check_order(order)
        for name, value, allowed in (
            (arg, expectation, EXPECTATIONS),
            ("probe_distribution", probe_distribution, PROBES),
            ("exact_method", exact_method, EXACT_METHODS),
        ):
            if value not in allowed:
                raise VarRedError(f"{name}: expected one of {allowed}, got {value!r}")
        if check_order(num_probes, name="num_probes") < 1:
            raise VarRedError(f"num_probes: expected a positive integer, got {num_probes}")
        if expectation == "probe" and probe_distribution == "rademacher" and self.order > 3:
            raise VarRedError(
                f"probe_distribution: 'rademacher' probes are biased for the order-4 mean "
                f"(E z⁴ = 1, not 3); expected order ≤ 3 or 'gaussian', got order={self.order}"
            )
        self.mean_method = expectation
        self.num_probes = int(num_probes)
        self.probe_distribution = probe_distribution
        self.exact_method = exact_method
        self.max_evaluations = int(max_evaluations)
        self.chunk_size = chunk_size
        self.mean = None if mean is None else check_finite("mean", check_floating("mean", mean))
        if self.mean is not None and self.mean.ndim != 1:
            raise VarRedError(f"mean: expected shape [d], got {shape_str(self.mean)}")
        self.scale_tril = None
        if scale_tril is not None:
            L = check_finite("scale_tril", check_floating("scale_tril", scale_tril))
            if L.ndim != 2 or L.shape[0] != L.shape[1]:
                raise VarRedError(f"scale_tril: expected shape [d, d], got {shape_str(L)}")
            if self.mean is not None and L.shape[0] != self.mean.shape[0]:
                raise VarRedError(
                    f"scale_tril: expected shape [{self.mean.shape[0]}, {self.mean.shape[0]}] "
                    f"to match mean {shape_str(self.mean)}, got {shape_str(L)}"
                )
            self.scale_tril = L
        self._f_checked = False

    # ------------------------------------------------------------------ inputs
    def _dim(self) -> int | None:
        for t in (self.mean, self.scale_tril):
            if t is not None:
                return int(t.shape[0])
        return None

    def _prepare(self, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Validate ``eps`` ``[n, d]``; return expansion points and directions, both ``[n, d]``."""
        eps = check_floating("eps", eps)
        if eps.ndim != 2:
            raise VarRedError(f"eps: expected shape [n, d], got {shape_str(eps)}")
        d = self._dim()
        if d is not None and eps.shape[1] != d:
            raise VarRedError(
                f"eps: expected shape [n, {d}] to match mean/scale_tril, got {shape_str(eps)}"
            )
        check_finite("eps", eps)
        return self._point(eps.shape[1], eps).expand_as(eps).clone(), self._directions(eps)

    def _point(self, d: int, like: torch.Tensor) -> torch.Tensor:
        if self.mean is None:
            return torch.zeros(1, d, dtype=like.dtype, device=like.device)
        return self.mean.to(like).reshape(1, d)

    def _directions(self, eps: torch.Tensor) -> torch.Tensor:
        """``L ε`` row-wise: ``[..., d] -> [..., d]``."""
        return eps if self.scale_tril is None else eps @ self.scale_tril.to(eps).T

    def _check_f(self, x: torch.Tensor) -> None:
        """Once per object: ``f`` returns ``[1, ...]`` tensors that depend differentiably on ``x``."""
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            y = self.f(x)
            if not isinstance(y, torch.Tensor):
                raise VarRedError(
                    f"f: expected it to return a torch.Tensor, got {type(y).__name__}"
                )
            if y.ndim == 0 or y.shape[0] != x.shape[0]:
                raise VarRedError(
                    f"f: expected an output of shape [{x.shape[0]}, ...] for an input of shape "
                    f"{shape_str(x)}, got {shape_str(y)}"
                )
            if not y.is_floating_point():
                raise VarRedError(f"f: expected a floating output, got dtype {y.dtype}")
            dep = y.requires_grad and torch.autograd.grad(y.sum(), x, allow_unused=True)[0]
            if dep is None or dep is False:
                raise VarRedError(
                    "f: expected an output that depends differentiably on its input; got one "
                    "with no autograd path to the input (does f use .detach(), .item() or numpy? "
                    "a constant f has a zero Taylor CV; write it as c + 0 * x[:, 0] if meant)"
                )
        self._f_checked = True

    def _terms(self, x0: torch.Tensor, v: torch.Tensor, order: int) -> list[torch.Tensor]:
        if not self._f_checked:
            self._check_f(x0[:1] + v[:1])
        try:
            terms = taylor_terms(self.f, x0, v, order)
        except RuntimeError as err:
            raise VarRedError(
                f"f: expected a function that torch.func.jvp can differentiate along its input "
                f"(no numpy, .item(), data access or in-place ops on it); got the error: {err}"
            ) from err
        if not isinstance(terms[0], torch.Tensor) or terms[0].ndim == 0:
            raise VarRedError(f"f: expected a tensor output [n, ...], got {terms[0]!r}")
        if terms[0].shape[0] != x0.shape[0]:
            raise VarRedError(
                f"f: expected an output of shape [{x0.shape[0]}, ...] for an input of shape "
                f"{shape_str(x0)}, got {shape_str(terms[0])}"
            )
        return terms

    # ------------------------------------------------------------------ values
    def terms(self, eps: torch.Tensor) -> list[torch.Tensor]:
        """``[D^j f̃(0)[ε^j] for j = 0..k]``, each ``[n, *out]`` (not divided by ``j!``)."""
        return self._terms(*self._prepare(eps), self.order)

    def polynomial(self, eps: torch.Tensor) -> torch.Tensor:
        """``T^k f̃(ε) = Σ_{j≤k} D^j f̃(0)[ε^j] / j!``: ``[n, d] -> [n, *out]``."""
        return sum_scaled(self.terms(eps), start=0)

    def remainder(self, eps: torch.Tensor) -> torch.Tensor:
        """``R^k(ε) = f̃(ε) − T^k f̃(ε)`` ``[n, *out]``; ``O(|ε|^{k+1})``, zero for degree ≤ k."""
        x0, v = self._prepare(eps)
        return self.f(x0 + v) - sum_scaled(self._terms(x0, v, self.order), start=0)

    # ------------------------------------------------------------------ means
    @property
    def expectation_kind(self) -> str:
        """Deprecated alias of :attr:`mean_method`."""
        return self.mean_method

    def exact_route(self, d: int) -> str:
        """The exact route ``"cubature"`` or ``"laplacian"`` used in dimension ``d``.

        Raises:
            VarRedError: the forced or every route needs more than ``max_evaluations`` rows.
        """
        k_even = self.order - self.order % 2
        rows = {"cubature": cubature_size(d, k_even), "laplacian": laplacian_rows(d, k_even // 2)}
        cost = {"cubature": rows["cubature"] * 2**k_even, "laplacian": 0}
        cost["laplacian"] = sum(math.comb(d + m - 1, m) * 4**m for m in range(1, k_even // 2 + 1))
        allowed = [r for r in rows if rows[r] <= self.max_evaluations]
        if self.exact_method != "auto":
            allowed = [r for r in allowed if r == self.exact_method]
        if not allowed:
            raise VarRedError(
                f"mean_method: the exact mean for d={d}, order={self.order} needs "
                f"{', '.join(f'{r} {_count(n)}' for r, n in rows.items())} rows, more than "
                f"max_evaluations={self.max_evaluations} "
                f"(exact_method={self.exact_method!r}); use mean_method='probe' (unbiased, any d)"
            )
        return min(allowed, key=lambda r: cost[r])

    def _even_mean(self, d: int, like: torch.Tensor) -> torch.Tensor | None:
        """``Σ_{even 2 ≤ j ≤ k} E[D^j f̃(0)[ε^j]] / j!`` ``[*out]`` (``None`` when ``k < 2``)."""
        k_even = self.order - self.order % 2
        if k_even < 2:
            return None
        point = self._point(d, like)  # [1, d]
        if self.exact_route(d) == "cubature":
            nodes, weights = gauss_hermite_cubature(
                d, k_even, dtype=like.dtype, device=like.device, max_nodes=self.max_evaluations
            )  # [M, d], [M]
            terms = self._terms(point.expand_as(nodes).clone(), self._directions(nodes), k_even)
            even = sum_scaled(terms, start=2, step=2)  # [M, *out]
            return (weights.reshape(-1, *([1] * (even.ndim - 1))) * even).sum(0)
        L = None if self.scale_tril is None else self.scale_tril.to(like)
        if not self._f_checked:
            self._check_f(point)
        total: torch.Tensor | None = None
        for m in range(1, k_even // 2 + 1):
            try:
                lap = iterated_laplacian(
                    self.f, point[0], m, scale_tril=L, chunk_size=self.chunk_size
                )
            except RuntimeError as err:
                raise VarRedError(
                    f"f: expected a function that torch.func.jvp can differentiate along its "
                    f"input; got the error: {err}"
                ) from err
            # E[D^{2m}[ε^{2m}]] / (2m)! = (2m − 1)!! Δ^m / (2m)! = Δ^m / (2^m m!)
            part = lap / (2**m * math.factorial(m))
            total = part if total is None else total + part
        return total

    def expectation(
        self,
        *,
        d: int | None = None,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """Exact ``E[T^k f̃(ε)] = Σ_{m ≤ k/2} Δ^m f̃(0) / (2^m m!)`` ``[*out]``.

        Args:
            d: dimension; needed only when neither ``mean`` nor ``scale_tril`` was given.
            dtype: dtype of the evaluation points when ``mean`` is not given.
            device: device of the evaluation points when ``mean`` is not given.

        Raises:
            VarRedError: ``d`` missing or inconsistent, or the exact mean is unaffordable.
        """
        known = self._dim()
        if d is None and known is None:
            raise VarRedError("d: expected the dimension (no mean/scale_tril given), got None")
        if d is not None and known is not None and d != known:
            raise VarRedError(f"d: expected {known} to match mean/scale_tril, got {d}")
        d = known if d is None else check_order(d, name="d")
        assert d is not None
        like = self.mean if self.mean is not None else torch.zeros((), dtype=dtype, device=device)
        point = self._point(d, like)
        f0 = self._terms(point, torch.zeros_like(point), 0)[0][0]  # f̃(0) [*out]
        even = self._even_mean(d, point)
        return f0 if even is None else f0 + even

    def _probes(
        self,
        eps: torch.Tensor,
        generator: torch.Generator | None,
        probe_noise: torch.Tensor | None,
    ) -> torch.Tensor:
        """Probes ``[P, n, d]`` from ``probe_noise`` or drawn with ``generator``."""
        shape = (self.num_probes, *eps.shape)
        if probe_noise is not None:
            probe_noise = check_floating("probe_noise", probe_noise)
            if tuple(probe_noise.shape) != shape:
                raise VarRedError(
                    f"probe_noise: expected shape [{shape[0]}, {shape[1]}, {shape[2]}] "
                    f"(num_probes, n, d), got {shape_str(probe_noise)}"
                )
            return check_finite("probe_noise", probe_noise).to(eps)
        if generator is None:
            raise VarRedError(
                "generator: mean_method='probe' needs independent probes; expected a "
                "torch.Generator or probe_noise [num_probes, n, d], got neither"
            )
        if self.probe_distribution == "gaussian":
            return torch.randn(
                shape, generator=generator, dtype=eps.dtype, device=generator.device
            ).to(eps.device)
        signs = torch.randint(0, 2, shape, generator=generator, device=generator.device)
        return (2 * signs - 1).to(eps)

    def __call__(
        self,
        eps: torch.Tensor,
        *,
        generator: torch.Generator | None = None,
        probe_noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Zero-mean control ``T^k f̃(ε) − E[T^k f̃]`` ``[n, d] -> [n, *out]``.

        ``f̃(0)`` cancels exactly; odd orders have mean zero and are never subtracted.

        Args:
            eps: standard-normal samples ``[n, d]``.
            generator: draws the probes (``mean_method="probe"``, ``order ≥ 2``).
            probe_noise: explicit probes ``[num_probes, n, d]`` instead of ``generator``.
        """
        x0, v = self._prepare(eps)
        n, d = eps.shape
        k = self.order
        if self.mean_method == "probe" and k >= 2:
            probes = self._probes(eps, generator, probe_noise)  # [P, n, d]
            pv = self._directions(probes).reshape(-1, d)  # [P, n, d] -> [P*n, d]
            x_all = torch.cat([x0, x0[:1].expand(pv.shape[0], d)])  # [(1+P)n, d]
            terms = self._terms(x_all, torch.cat([v, pv]), k)
            sample = sum_scaled([t[:n] for t in terms], start=1)  # [n, *out]
            probe = sum_scaled([t[n:] for t in terms], start=2, step=2)  # [P*n, *out]
            return sample - probe.reshape(self.num_probes, n, *probe.shape[1:]).mean(0)
        if k == 0:  # T^0 f̃ = f̃(0) is its own mean: the control is zero (shape from one row)
            y0 = self._terms(x0[:1], v[:1], 0)[0]  # [1, *out]
            return torch.zeros((n, *y0.shape[1:]), dtype=y0.dtype, device=y0.device)
        terms = self._terms(x0, v, k)
        out = sum_scaled(terms, start=1)
        even = self._even_mean(d, eps) if self.mean_method == "exact" else None
        return out if even is None else out - even
