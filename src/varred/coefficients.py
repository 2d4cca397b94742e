r"""Optimal control-variate coefficients: :math:`\beta^* = \mathrm{Cov}(c)^{-1}\mathrm{Cov}(c, f)`.

Shapes used throughout: ``f_values [n, *out]``; ``controls [n, *out]`` (one control
per output) or ``[n, *out, m]`` (``m`` stacked controls). Internally both are
flattened to ``f [n, P]`` and ``c [n, P, m]`` with ``P = prod(out)``.

Statistics are centred weighted moments (:mod:`varred.moments`: weight, means of c and f,
``Cov(c)``, ``Cov(c, f)``, ``Var f``) in float64, computed from detached values, so β is never differentiated through. A control with zero
sample variance (relative to its second moment) gets β = 0, never NaN.
References: Owen (2013) §8.9; Glasserman (2004) §4.1.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import torch

from varred.errors import VarRedError, check_floating, shape_str
from varred.moments import Moments, batch_moments, check_decay, merge
from varred.vocabulary import BetaLayout, Fit, canonical

__all__ = ["OptimalCoefficient", "RunningMoments"]

_KINDS = (BetaLayout.SCALAR, BetaLayout.ELEMENT, BetaLayout.FULL)  # "diagonal" = "element"
_FITS = (Fit.CROSSFIT, Fit.BATCH, Fit.RUNNING)
_STAT_DTYPE = torch.float64
_VAR_RTOL = 1e-10  # Var(c) <= _VAR_RTOL * E[c^2] counts as a constant control
_PINV_RTOL = 1e-10  # singular values below this (relative, correlation scale) are dropped


def flatten_controls(
    f_values: torch.Tensor, controls: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Size, bool]:
    """Validate and flatten: ``[n, *out], [n, *out(, m)] -> [n, P], [n, P, m]`` (views)."""
    check_floating("f_values", f_values)
    check_floating("controls", controls)
    if f_values.ndim < 1:
        raise VarRedError(f"f_values: expected shape [n, *out], got {shape_str(f_values)}")
    if controls.shape == f_values.shape:
        stacked = False
        m = 1
    elif controls.ndim == f_values.ndim + 1 and controls.shape[:-1] == f_values.shape:
        stacked = True
        m = controls.shape[-1]
    else:
        raise VarRedError(
            f"controls: expected shape {shape_str(f_values)} or {shape_str(f_values)[:-1]}, m] "
            f"(that of f_values, optionally with m stacked controls), got {shape_str(controls)}"
        )
    n = f_values.shape[0]
    out = f_values.shape[1:]
    p = math.prod(out)
    return f_values.reshape(n, p), controls.reshape(n, p, m), out, stacked


_PAIRS = {
    "cov_cc": ("c", "c", "...i,...j->...ij"),  # [P, m, m]
    "cov_cf": ("c", "f", "...i,...->...i"),  # [P, m]
    "cov_ff": ("f", "f", "...,...->..."),  # [P]
}


def _moments(f2: torch.Tensor, c3: torch.Tensor) -> Moments:
    """Centred moments of ``f [n, P]``, ``c [n, P, m]`` in float64 (detached, two-pass)."""
    f = f2.detach().to(_STAT_DTYPE)
    return batch_moments({"c": c3.detach().to(_STAT_DTYPE), "f": f}, _PAIRS)


def _solve(cov: torch.Tensor, cf: torch.Tensor, m2: torch.Tensor, ridge: float) -> torch.Tensor:
    """Ridge solve ``(Cov + ridge·diag Cov) β = Cov(c, f)`` in correlation scale.

    Args:
        cov: ``[..., m, m]``; cf: ``[..., m]``; m2: ``[..., m]`` raw second moments.

    Returns:
        ``[..., m]``; zero for controls whose variance is (numerically) zero.
    """
    var = torch.diagonal(cov, dim1=-2, dim2=-1)
    ok = (var > _VAR_RTOL * m2) & (var > 0)
    d = torch.where(ok, var, torch.ones_like(var)).sqrt()
    okf = ok.to(cov.dtype)
    corr = cov / (d.unsqueeze(-1) * d.unsqueeze(-2)) * (okf.unsqueeze(-1) * okf.unsqueeze(-2))
    eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
    a = corr + ridge * eye
    b = torch.where(ok, cf / d, torch.zeros_like(cf))
    x = (torch.linalg.pinv(a, rtol=_PINV_RTOL, hermitian=True) @ b.unsqueeze(-1)).squeeze(-1)
    return torch.where(ok, x / d, torch.zeros_like(x))


def _beta_from_moments(s: Moments, kind: str, ridge: float) -> torch.Tensor:
    """β ``[P, m]`` (broadcast for ``scalar``) from centred moments."""
    kind = canonical("kind", kind, _KINDS)
    mc = s.mean["c"]  # [P, m]
    cov, cf = s.cov["cov_cc"], s.cov["cov_cf"]  # [P, m, m], [P, m]
    m2 = torch.diagonal(cov, dim1=-2, dim2=-1) + mc * mc  # [P, m] raw second moments
    if kind == "element":
        var = torch.diagonal(cov, dim1=-2, dim2=-1)
        ok = (var > _VAR_RTOL * m2) & (var > 0)
        return torch.where(ok, cf / torch.where(ok, var, torch.ones_like(var)), 0.0)
    if kind == "full":
        return _solve(cov, cf, m2, ridge)
    # scalar: one β per control from the pooled m x m system (shared over outputs)
    pooled = _solve(cov.sum(0), cf.sum(0), m2.sum(0), ridge)  # [m]
    return pooled.expand_as(cf)


def _public_beta(beta: torch.Tensor, kind: str, out: torch.Size, stacked: bool) -> torch.Tensor:
    """``[P, m]`` -> ``[*out(, m)]`` (``[(m)]`` for ``scalar``)."""
    if canonical("kind", kind, _KINDS) == "scalar":
        b = beta[0] if beta.shape[0] > 0 else beta.new_zeros(beta.shape[-1])
        return b if stacked else b.reshape(())
    b = beta.reshape(*out, beta.shape[-1])
    return b if stacked else b.squeeze(-1)


def apply_coefficient(f2: torch.Tensor, c3: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """``y = f - Σ_j β_j c_j``: ``[n, P], [n, P, m], [(n,) P, m] -> [n, P]`` (β detached)."""
    dtype = torch.promote_types(f2.dtype, torch.float32)
    b = beta.detach().to(device=f2.device, dtype=dtype)
    return f2.to(dtype) - (b * c3.to(dtype)).sum(-1)


class RunningMoments:
    r"""Exponentially-weighted centred moments of ``(c, f)`` for β across calls.

    After each :meth:`update` the running weight decays by ``decay`` and the batch is merged
    in with weight ``n`` (Chan et al. 1979; :func:`varred.moments.merge`), so every statistic
    is a weighted mean over batches with weights ``decay^age`` (``decay = 1``: all history
    with equal weight).

    Args:
        decay: forgetting factor in ``(0, 1]``.

    Example:
        >>> rm = RunningMoments(decay=0.9)
        >>> f = torch.randn(8, 3, dtype=torch.float64); rm.update(f, f)
        >>> rm.beta("diagonal").shape
        torch.Size([3])
    """

    def __init__(self, decay: float = 0.99) -> None:
        self.decay = check_decay(decay)
        self.reset()

    def reset(self) -> None:
        """Forget all statistics."""
        self._moments: Moments | None = None
        self._out: torch.Size | None = None
        self._stacked: bool | None = None

    @property
    def weight(self) -> float:
        """Total (decayed) number of samples seen; 0 before the first update."""
        return 0.0 if self._moments is None else float(self._moments.weight)

    def update(self, f_values: torch.Tensor, controls: torch.Tensor) -> None:
        """Fold a batch in.

        Args:
            f_values: ``[n, *out]``.
            controls: ``[n, *out]`` or ``[n, *out, m]``; same layout on every call.

        Raises:
            VarRedError: on bad shapes or a layout that changed since the first call.
        """
        f2, c3, out, stacked = flatten_controls(f_values, controls)
        with torch.no_grad():
            s = _moments(f2, c3)
            if self._moments is None:
                self._moments, self._out, self._stacked = s, out, stacked
                return
            m = self._moments.mean["c"].shape[-1]
            if out != self._out or stacked != self._stacked or c3.shape[-1] != m:
                raise VarRedError(
                    f"controls: expected the layout of earlier calls (out {list(self._out or [])}, "
                    f"m = {m}, stacked = {self._stacked}), got "
                    f"f_values {shape_str(f_values)} and controls {shape_str(controls)}"
                )
            dev = self._moments.weight.device
            s = Moments(s.weight.to(dev), {k: v.to(dev) for k, v in s.mean.items()},
                        {k: v.to(dev) for k, v in s.cov.items()})  # fmt: skip
            self._moments = merge(self._moments, s, _PAIRS, self.decay)

    def beta(self, kind: str = "diagonal", ridge: float = 0.0) -> torch.Tensor:
        """β from the statistics so far: ``[*out(, m)]`` (``[(m)]`` for ``scalar``).

        Raises:
            VarRedError: before the first :meth:`update` (the shape is unknown) or on a
                bad ``kind``.
        """
        _check_kind(kind)
        if self._moments is None or self._out is None or self._stacked is None:
            raise VarRedError("RunningMoments.beta: no statistics yet; call update() first")
        with torch.no_grad():
            return _public_beta(
                _beta_from_moments(self._moments, kind, ridge), kind, self._out, self._stacked
            )

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only: decay, layout and moments (``weight``, ``mean_c``, ``mean_f``,
        ``cov_cc``, ``cov_cf``, ``cov_ff``; none before the first update)."""
        mom = self._moments
        dev = None if mom is None else mom.weight.device  # all on the moments' device
        state = {"decay": torch.tensor(self.decay, dtype=_STAT_DTYPE, device=dev)}
        if mom is not None and self._out is not None:
            state["out_shape"] = torch.tensor(list(self._out), dtype=torch.long, device=dev)
            state["stacked"] = torch.tensor(bool(self._stacked), device=dev)
            state["weight"] = mom.weight.clone()
            state.update({f"mean_{k}": v.clone() for k, v in mom.mean.items()})
            state.update({k: v.clone() for k, v in mom.cov.items()})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.decay = check_decay(float(state["decay"]))
        self.reset()
        if "out_shape" in state:
            self._out = torch.Size(int(s) for s in state["out_shape"].tolist())
            self._stacked = bool(state["stacked"])
            self._moments = Moments(
                state["weight"].clone(),
                {k: state[f"mean_{k}"].clone() for k in ("c", "f")},
                {k: state[k].clone() for k in _PAIRS},
            )


def _check_kind(kind: object) -> str:
    return canonical("kind", kind, _KINDS)


@dataclass(frozen=True)
class OptimalCoefficient:
    r"""How to fit β for :math:`y_i = f_i - \beta^\top c_i` (Glasserman 2004, §4.1).

    Args:
        kind: a :class:`varred.vocabulary.BetaLayout`: ``"scalar"`` (one β per control pooled
            over outputs: ``[]`` / ``[m]``), ``"element"`` or its alias ``"diagonal"`` (per
            output and control, univariate: ``[*out]`` / ``[*out, m]``)
            or ``"full"`` (per output, joint regression on the m controls).
        fit: ``"crossfit"`` (K folds; fold k uses β fitted on the other folds, so the
            controlled mean is unbiased), ``"batch"`` (plug-in β on the same samples;
            biased by O(1/n)) or ``"running"`` (β from earlier calls only, then the batch
            is folded into exponentially-weighted statistics; first call → β = 0).
        folds: number of folds K >= 2 for ``crossfit``.
        ridge: λ >= 0; ``full``/``scalar`` solve ``(Cov(c) + λ diag Cov(c)) β = Cov(c, f)``
            (scale-aware: λ is relative to each control's variance).
        decay: forgetting factor for ``running``.

    Example:
        >>> coef = OptimalCoefficient(kind="diagonal", fit="crossfit", folds=5)
        >>> x = torch.randn(100, dtype=torch.float64)
        >>> y, beta = coef.controlled(torch.exp(x), x)
        >>> y.shape, beta.shape
        (torch.Size([100]), torch.Size([]))
    """

    kind: str = "diagonal"
    fit: str = "crossfit"
    folds: int = 5
    ridge: float = 0.0
    decay: float = 0.99
    _moments: RunningMoments | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_kind(self.kind)
        canonical("fit", self.fit, _FITS)
        if isinstance(self.folds, bool) or not isinstance(self.folds, int) or self.folds < 2:
            raise VarRedError(f"folds: expected an integer >= 2, got {self.folds!r}")
        r = self.ridge
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 <= r < math.inf:
            raise VarRedError(f"ridge: expected a finite float >= 0, got {r!r}")
        if self.fit == "running":
            object.__setattr__(self, "_moments", RunningMoments(self.decay))
        else:
            check_decay(self.decay)

    @property
    def moments(self) -> RunningMoments | None:
        """The running statistics (``fit="running"`` only, else ``None``)."""
        return self._moments

    def beta(self, f_values: torch.Tensor, controls: torch.Tensor) -> torch.Tensor:
        """β fitted on all the given samples (no application), under ``no_grad``.

        Args:
            f_values: ``[n, *out]``; controls: ``[n, *out]`` or ``[n, *out, m]``.

        Returns:
            ``[*out(, m)]``, or ``[(m)]`` for ``kind="scalar"``.
        """
        f2, c3, out, stacked = flatten_controls(f_values, controls)
        _check_n(f2.shape[0], 2, "to fit beta")
        with torch.no_grad():
            f2 = f2.detach().to(_STAT_DTYPE)
            f2 = f2 - f2.mean(0)  # shift: β is invariant, sums better scaled
            return _public_beta(
                _beta_from_moments(_moments(f2, c3), self.kind, self.ridge), self.kind, out, stacked
            )

    def controlled(
        self, f_values: torch.Tensor, controls: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Controlled per-sample values and the coefficient.

        Args:
            f_values: ``[n, *out]``; controls: ``[n, *out]`` or ``[n, *out, m]``.

        Returns:
            ``(y, beta)``: ``y [n, *out]`` (dtype at least float32; differentiable in
            ``f_values``/``controls``, not through β) and β (shape as :meth:`beta`):
            fitted on all samples for ``crossfit``/``batch``, the one applied for
            ``running``.

        Raises:
            VarRedError: bad shapes/dtypes, ``n < 2`` (crossfit/batch) or ``folds > n``.
        """
        f2, c3, out, stacked = flatten_controls(f_values, controls)
        n = f2.shape[0]
        if self.fit == "running":
            assert self._moments is not None
            with torch.no_grad():
                if self._moments._moments is not None:
                    b = _beta_from_moments(self._moments._moments, self.kind, self.ridge)
                else:
                    b = torch.zeros(c3.shape[1:], dtype=_STAT_DTYPE, device=f2.device)
            y = apply_coefficient(f2, c3, b)
            self._moments.update(
                f_values, controls
            )  # after β is taken: the batch never sees itself
            return y.reshape(f_values.shape), _public_beta(b, self.kind, out, stacked)
        _check_n(n, 2, f"to fit beta (fit={self.fit!r})")
        with torch.no_grad():
            fs = f2.detach().to(_STAT_DTYPE)
            fs = fs - fs.mean(0)  # [n, P]; β is shift-invariant in f
            if self.fit == "batch":
                b = _beta_from_moments(_moments(fs, c3), self.kind, self.ridge)
        if self.fit == "batch":
            y = apply_coefficient(f2, c3, b)
            return y.reshape(f_values.shape), _public_beta(b, self.kind, out, stacked)
        with torch.no_grad():
            if self.folds > n:
                raise VarRedError(
                    f"folds: expected at most n = {n} folds (one sample each at least), got {self.folds}"
                )
            bounds = [(k * n) // self.folds for k in range(self.folds + 1)]
            folds = [_moments(fs[a:b_], c3[a:b_]) for a, b_ in itertools.pairwise(bounds)]
            betas = [
                _beta_from_moments(_merge_all(folds[:k] + folds[k + 1 :]), self.kind, self.ridge)
                for k in range(len(folds))
            ]
            b_all = _beta_from_moments(_merge_all(folds), self.kind, self.ridge)
        parts = [
            apply_coefficient(f2[a:b_], c3[a:b_], beta)
            for (a, b_), beta in zip(itertools.pairwise(bounds), betas)
        ]
        y = torch.cat(parts, 0)  # K x [n_k, P] -> [n, P]
        return y.reshape(f_values.shape), _public_beta(b_all, self.kind, out, stacked)


def _merge_all(parts: list[Moments]) -> Moments:
    """Pool the moments of disjoint sample sets (decay 1)."""
    out = parts[0]
    for m in parts[1:]:
        out = merge(out, m, _PAIRS)
    return out


def _check_n(n: int, minimum: int, why: str) -> None:
    if n < minimum:
        raise VarRedError(f"f_values: expected at least {minimum} samples {why}, got n = {n}")
