"""Gradient-level control variates: per-element/tensor/scalar coefficients for training, DDP-ready.

Given per-sample losses ``ℓ_i`` and zero-mean controls ``c_i`` (both differentiable in the
parameters θ), :class:`GradientControl` writes into every ``p.grad``

.. math:: g = \\frac1B \\sum_i \\nabla ℓ_i - \\sum_g β_g \\odot \\nabla \\frac1B \\sum_{i \\in g} c_i,

with β fitted from gradient statistics of *earlier* steps (or, in ``per_sample`` mode, of earlier
batches or other folds of this batch), never differentiated through. A fixed scalar β gives the
gradient of ``mean(ℓ - β c)`` (Jeha et al. 2024, Thm. 3.3/3.4). See ``docs/gradient.md``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from varred.errors import VarRedError, check_floating, shape_str
from varred.flat_grad import flat_grad, flat_grad_rows
from varred.gradient_config import GradientControlConfig, check_params
from varred.layout import CoefficientLayout
from varred.moments import Moments, all_finite, merge, merge_moments, observe, safe_div

__all__ = ["GradientControl", "GradientControlConfig", "merge_moments"]

Tensor = torch.Tensor
_STATS = ("mean_c", "mean_l", "cov_cc", "cov_cl", "cov_ll")
# running/fixed modes also track moments of the applied (controlled) and plain step gradients
_EW = "...,...->..."  # element-wise covariances; "...,...->" keeps a trace
_PAIRS = {"cov_cc": ("c", "c", _EW), "cov_cl": ("c", "l", _EW), "cov_ll": ("l", "l", _EW)}
_TRACK_PAIRS = {
    "ctl_var": ("ctl", "ctl", "...,...->"),
    "plain_var": ("plain", "plain", "...,...->"),
}


def _resolve_layout(
    layout: Any, granularity: str | None, num_groups: int | None, shrinkage: float | None
) -> CoefficientLayout:
    """``layout=`` or the separate ``granularity``/``num_groups``/``shrinkage`` keywords."""
    given = {
        k: v
        for k, v in (
            ("granularity", granularity),
            ("num_groups", num_groups),
            ("shrinkage", shrinkage),
        )
        if v is not None
    }
    if layout is None:
        ng = num_groups
        if ng is not None and (isinstance(ng, bool) or not isinstance(ng, int) or ng < 1):
            raise VarRedError(f"num_groups: expected an integer >= 1, got {ng!r}")
        return CoefficientLayout(
            granularity if granularity is not None else "element",
            num_groups if num_groups is not None else 1,
            shrinkage,  # None: the layout's default (100 for per-element β with groups > 1)
        )
    if not isinstance(layout, CoefficientLayout):
        raise VarRedError(
            f"layout: expected a varred.layout.CoefficientLayout or None, got {type(layout).__name__}"
        )
    if given:
        raise VarRedError(
            f"layout: expected either layout= or the keywords {', '.join(sorted(given))} (they "
            f"conflict; put them in the CoefficientLayout), got both"
        )
    return layout


class GradientControl:
    """Gradient-level control variate with per-element, per-tensor or scalar coefficients.

    ``backward(losses, controls, groups)`` overwrites (never accumulates) each ``p.grad`` with

    .. math:: g = \\overline{\\nabla ℓ} - \\sum_g β_g \\odot \\nabla \\tfrac1B \\textstyle\\sum_{i \\in g} c_i .

    Controls must have mean zero for every θ so that their θ-gradients do too (Jeha et al. 2024,
    Sec. 3). β is a detached tensor of shape ``[num_groups, *p.shape]`` (element) or
    ``[num_groups, 1, ..., 1]`` (tensor/scalar), fitted without using the current step's
    gradients, so the controlled gradient stays unbiased.

    Internally every gradient and statistic is one flat buffer over the ``P`` parameter entries
    (``[P]``, ``[G, P]``; parameters in order, each flattened), so a step costs a handful of
    vectorised kernels whatever the number of parameter tensors.

    Args:
        params: parameter tensors (``requires_grad=True``, all on one device) whose ``.grad``
            is written.
        layout: a :class:`varred.layout.CoefficientLayout` (granularity × groups, shrinkage);
            exposed as ``ctrl.layout``. Giving it together with ``granularity``, ``num_groups``
            or ``shrinkage`` raises :class:`VarRedError` (use one or the other).
        granularity: ``"element"`` (one β per parameter entry), ``"tensor"`` (statistics pooled
            over each tensor) or ``"scalar"`` (pooled over all parameters); always × groups.
        coefficient: ``"running"`` (β from exponentially weighted statistics of earlier steps'
            batch gradients ``(g_c, g_ℓ)``; costs ``1 + 1`` backward passes, the control one
            batched over groups), ``"per_sample"`` (β from per-sample gradients, exact within the
            batch; ``B``-times the gradient memory, for small models) or a float (fixed β; equals
            ``mean(ℓ - β c).backward()``).
        decay: forgetting factor of the running statistics in ``(0, 1]`` (1 = cumulative).
        num_groups: number of sample groups (e.g. σ bins), each with its own β.
        process_group: ``None`` (no communication), ``"default"`` (the initialised default
            group) or a ``torch.distributed`` process group over which gradients (running) or
            per-sample sufficient statistics (per_sample) are summed before any statistic is
            updated, so all ranks hold the same state and apply the same β.
        warmup_steps: β = 0 until this many finite updates were folded in (default 10 for
            running, 1 for per_sample; a fixed β applies from the first step and ignores it).
        per_sample_fit: ``"running"`` (β from earlier batches; default) or ``"crossfit"``
            (``folds`` folds of this batch by sample index, each using β from the other folds).
        folds: number of cross-fitting folds (``per_sample_fit="crossfit"`` only).
        nonfinite: the policy for a step with NaN/Inf in losses, controls or gradients (the
            statistics are always left untouched): ``"propagate"`` writes the (non-finite)
            gradient so that AMP GradScaler-style checks skip the step, ``"zero"`` writes
            zeros, ``"raise"`` raises :class:`VarRedError` (one host sync per step).
        raise_on_nonfinite: deprecated; ``True`` means ``nonfinite="raise"``.
        validate: check that ``groups`` lies in ``[0, num_groups)`` (one host sync per step).
        group_backward: how the ``G`` group (or ``B`` per-sample) backward passes of the
            controls run: ``"batched"`` (one ``is_grads_batched`` pass), ``"loop"`` (one pass
            each; for graphs with ops that have no vmap batching rule, e.g. ``torch.func.jvp``)
            or ``"auto"`` (default: try batched, fall back to the loop when the graph has no
            vmap batching rule, never on out-of-memory or device errors, and remember the
            choice for later steps).
        shrinkage: per-element β only: κ ≥ 0 pseudo-observations of the per-tensor β,
            ``β_e = (Cov_e + a β_tensor) / (Var_e + a)`` with ``a = κ · mean Var / weight``
            (``weight`` ≈ steps seen, or samples in per-sample mode), so β starts near the
            per-tensor value and becomes per-element as statistics accumulate. 0 (default):
            plain per-element ratios. For many groups (σ bins) × P entries fitted from a
            few steps (benchmarks/coefficient_granularity.py). Default (``None``): 100 for
            per-element β with ``num_groups > 1``, else 0 (see :class:`CoefficientLayout`).

    Raises:
        VarRedError: invalid options or ``params``.

    Example:
        >>> net = torch.nn.Linear(3, 1)
        >>> ctrl = GradientControl(net.parameters(), coefficient=0.5)
        >>> x, z = torch.randn(8, 3), torch.randn(8, 3)
        >>> d = ctrl.backward(net(x).squeeze(1) ** 2, (net(z).squeeze(1) - net.bias) * z[:, 0])
        >>> net.weight.grad.shape
        torch.Size([1, 3])
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Tensor,
        *,
        layout: CoefficientLayout | None = None,
        granularity: str | None = None,
        coefficient: str | float = "running",
        decay: float = 0.99,
        num_groups: int | None = None,
        process_group: Any = None,
        warmup_steps: int | None = None,
        per_sample_fit: str = "running",
        folds: int = 2,
        nonfinite: str = "propagate",
        raise_on_nonfinite: bool = False,
        validate: bool = True,
        group_backward: str = "auto",
        shrinkage: float | None = None,
    ) -> None:
        if raise_on_nonfinite:
            warnings.warn(
                "raise_on_nonfinite=True is deprecated; use nonfinite='raise'",
                DeprecationWarning,
                stacklevel=2,
            )
            nonfinite = "raise"
        if warmup_steps is None:
            warmup_steps = 1 if coefficient == "per_sample" else 10
        self.layout = _resolve_layout(layout, granularity, num_groups, shrinkage)
        lay = self.layout
        self.config = GradientControlConfig(
            lay.granularity, coefficient, decay, lay.num_groups, warmup_steps, per_sample_fit,
            folds, nonfinite, nonfinite == "raise", validate, group_backward, lay.shrinkage,
        )  # fmt: skip
        if isinstance(process_group, str) and process_group != "default":
            raise VarRedError(
                f"process_group: expected None, 'default' or a ProcessGroup, got {process_group!r}"
            )
        self.params = check_params(params)
        self.process_group = process_group
        is64 = any(p.dtype == torch.float64 for p in self.params)
        self._dtype = torch.float64 if is64 else torch.float32
        self._device = self.params[0].device
        self._sizes = [p.numel() for p in self.params]
        self._numel = sum(self._sizes)
        # [npar] segment lengths of the flat buffer, for per-tensor pooling (segment_reduce)
        self._lengths = torch.tensor(self._sizes, dtype=torch.long, device=self._device)
        choice = {"auto": None, "batched": True, "loop": False}[group_backward]
        self._batched_choice = {"losses": choice, "controls": choice}  # per graph; auto: None
        self._scale: Tensor | None = None  # GradScaler scale during backward(scaler=...)
        self.reset()

    # ---------------------------------------------------------------- state
    @property
    def _per_sample(self) -> bool:
        return self.config.coefficient == "per_sample"

    @property
    def num_updates(self) -> Tensor:
        """``[]`` int64: number of finite steps folded into the statistics."""
        return self._num_updates

    def reset(self) -> None:
        """Forget all statistics (β returns to 0 until the warmup is over again)."""
        g = self.config.num_groups
        gl = g if self._per_sample else 1
        kw: dict[str, Any] = {"dtype": self._dtype, "device": self._device}
        p = self._numel
        self._stats = {
            k: torch.zeros(gl if k in ("mean_l", "cov_ll") else g, p, **kw) for k in _STATS
        }
        self._weight = torch.zeros(gl, **kw)
        self._num_updates = torch.zeros((), dtype=torch.int64, device=self._device)
        self._track = {} if self._per_sample else {
            "track_weight": torch.zeros(1, **kw),
            "ctl_mean": torch.zeros(p, **kw),
            "plain_mean": torch.zeros(p, **kw),
            "ctl_var": torch.zeros((), **kw),
            "plain_var": torch.zeros((), **kw),
        }  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        """Statistics as tensors and ints only (loadable with ``torch.load(weights_only=True)``).

        Keys: ``num_groups``, ``num_params``, ``num_elements`` (ints), ``weight``,
        ``num_updates``, the flat statistics ``mean_c``/``cov_cc``/``cov_cl`` ``[G, P]`` and
        ``mean_l``/``cov_ll`` ``[1 or G, P]``, and in running/fixed modes the tracked moments of
        the applied gradient (``track_weight``, ``ctl_mean``, ``plain_mean`` ``[P]``,
        ``ctl_var``, ``plain_var`` ``[]``).
        """
        sd: dict[str, Any] = {
            "num_groups": self.config.num_groups,
            "num_params": len(self.params),
            "num_elements": self._numel,
            "weight": self._weight.clone(),
            "num_updates": self._num_updates.clone(),
        }
        sd.update({k: v.clone() for k, v in self._stats.items()})
        sd.update({k: v.clone() for k, v in self._track.items()})
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore statistics saved by :meth:`state_dict` (shapes must match)."""
        mine = self.state_dict()
        if set(state_dict) != set(mine):
            raise VarRedError(f"state_dict: expected keys {sorted(mine)}, got {sorted(state_dict)}")
        for key, ref in mine.items():
            got = state_dict[key]
            if isinstance(ref, Tensor):
                if not isinstance(got, Tensor) or got.shape != ref.shape:
                    raise VarRedError(
                        f"state_dict[{key!r}]: expected a tensor of shape {shape_str(ref)}, "
                        f"got {shape_str(got)}"
                    )
            elif got != ref:
                raise VarRedError(f"state_dict[{key!r}]: expected {ref!r}, got {got!r}")
        self._weight = state_dict["weight"].to(self._weight).clone()
        self._num_updates = state_dict["num_updates"].to(self._num_updates).clone()
        self._stats = {k: state_dict[k].to(v).clone() for k, v in self._stats.items()}
        self._track = {k: state_dict[k].to(v).clone() for k, v in self._track.items()}

    # ---------------------------------------------------------------- coefficients
    def _pool(self, num: Tensor, den: Tensor, weight: Tensor | None = None) -> Tensor:
        """Flat ``Σ num / Σ den`` pooled by granularity: ``[L, P]`` → ``[L, P | npar | 1]``.

        Per element with ``shrinkage`` κ > 0 and the statistics' ``weight`` ``[L]`` (or
        ``[1]``): ``β_e = (num_e + a β_t) / (den_e + a)`` with ``a = κ · mean_t(den) / weight``,
        i.e. κ pseudo-observations of the per-tensor β_t of e's tensor t, fading as
        ``weight`` grows (a normal prior centred on β_t, scaled to the tensor's variance).
        """
        gran = self.config.granularity
        kappa = float(self.config.shrinkage)
        if gran == "element" and (kappa == 0.0 or weight is None):
            return safe_div(num, den)
        if gran == "scalar":
            return safe_div(num.sum(1, keepdim=True), den.sum(1, keepdim=True))
        lengths = self._lengths.expand(num.shape[0], -1)  # deterministic segmented sums
        sn = torch.segment_reduce(num, "sum", lengths=lengths, axis=1)  # [L, npar]
        sd = torch.segment_reduce(den, "sum", lengths=lengths, axis=1)
        beta_t = safe_div(sn, sd)
        if gran == "tensor":
            return beta_t
        assert weight is not None
        prior = kappa * (sd / self._lengths) / weight.clamp(min=1.0).reshape(-1, 1)  # [L, npar]
        a, b = self._expand(prior), self._expand(beta_t)  # [L, P]
        return safe_div(num + a * b, den + a)

    def _expand(self, beta: Tensor) -> Tensor:
        """Compact β ``[L, P | npar | 1]`` → broadcastable against ``[L, P]``."""
        if beta.shape[1] == self._numel or beta.shape[1] == 1:
            return beta
        return beta.repeat_interleave(self._lengths, dim=1, output_size=self._numel)

    def _beta(self) -> Tensor:
        """β the next step applies, compact (see :meth:`_pool`), detached, ``[G, ·]``."""
        cfg = self.config
        if not isinstance(cfg.coefficient, str):
            return torch.full(
                (cfg.num_groups, 1), float(cfg.coefficient), dtype=self._dtype, device=self._device
            )
        beta = self._pool(self._stats["cov_cl"], self._stats["cov_cc"], self._weight)
        ready = self._num_updates >= cfg.warmup_steps
        return torch.where(ready, beta, 0.0)

    def coefficients(self) -> list[Tensor]:
        """Current β per parameter (what the next step applies in running modes), detached.

        Returns:
            per parameter ``[num_groups, *p.shape]`` (element) or ``[num_groups, 1, ..., 1]``.
        """
        beta = self._beta()
        g, gran = beta.shape[0], self.config.granularity
        if isinstance(self.config.coefficient, str) and gran == "element":  # [G, P]
            return [b.view(g, *p.shape) for b, p in zip(beta.split(self._sizes, 1), self.params)]
        if isinstance(self.config.coefficient, str) and gran == "tensor":  # [G, npar]
            return [beta[:, i].reshape((g,) + (1,) * p.dim()) for i, p in enumerate(self.params)]
        return [beta.view((g,) + (1,) * p.dim()) for p in self.params]  # [G, 1]

    # ---------------------------------------------------------------- step
    def backward(
        self,
        losses: Tensor,
        controls: Tensor | Sequence[Tensor],
        groups: Tensor | None = None,
        *,
        scaler: Any = None,
    ) -> dict[str, Tensor]:
        """Write the controlled gradient into every ``p.grad`` (overwriting) and update β.

        Args:
            losses: ``[B]`` per-sample losses, differentiable in ``params``.
            controls: ``[B]`` per-sample zero-mean controls, differentiable in ``params``; or,
                split by group, a sequence of ``num_groups`` tensors ``[n_0], …, [n_{G-1}]``
                (``Σ n_g = B``; ``losses`` then lists group 0's samples first, then group 1's,
                …, and ``groups`` must be ``None``). Split controls computed by separate
                forward passes (one per group) make the ``G`` control backward passes cover
                ``n_g`` rows each instead of ``B``: about one backward in all instead of ``G``
                (running and fixed modes; see ``docs/gradient.md``).
            groups: ``[B]`` integer group index in ``[0, num_groups)``; ``None`` = group 0.
                With a layout whose ``groups`` is a grouping object (e.g. σ bins), also the
                floating values it groups by (e.g. σ ``[B]``).
            scaler: a ``torch.amp.GradScaler`` for float16 training: the backward passes run
                on ``S·ℓ`` and ``S·c`` (``S`` its current scale, so small float16 gradients do
                not underflow), every statistic and β see the unscaled gradients, and
                ``p.grad`` holds ``S ×`` the controlled gradient, as ``scaler.step(optimizer)``
                expects (it unscales, and skips the step on Inf/NaN, which this step then left
                out of the statistics too). Sync-free: ``S`` enters as a tensor.

        Returns:
            diagnostics, all detached tensors (no host sync), computed after this step was
            folded in: ``variance_ratio`` ``[]`` (estimated ``tr Var[applied gradient] /
            tr Var[plain gradient]``, see ``docs/gradient.md``; ≥ 0, 1 before any β is
            applied), ``variance_ratio_per_group`` ``[G]`` (the same ratio with only group g's
            control applied, from the pairwise statistics), ``correlation`` ``[G]`` (pooled
            ρ), ``beta_mean``/``beta_min``/``beta_max`` ``[]``, ``grad_norm_loss``,
            ``grad_norm_control``, ``grad_norm`` ``[]``, ``finite`` ``[]`` bool,
            ``num_updates`` ``[]``.

        Raises:
            VarRedError: bad shapes/dtypes/groups, losses independent of ``params``, or
                non-finite values with ``nonfinite="raise"``.
        """
        self._scale = None if scaler is None else self._scale_of(scaler)
        groups = self.layout.index(groups)
        chunks: list[Tensor] | None = None
        if not isinstance(controls, Tensor):
            chunks, controls, groups = self._from_chunks(losses, controls, groups)
        batch = self._check_inputs(losses, controls, groups)
        active, pg = self._group()
        ready = self._num_updates >= self.config.warmup_steps  # β of this step is in use
        if self._per_sample:
            g_l, g_c, beta, finite, upd = self._per_sample_step(
                losses, controls, groups, batch, active, pg
            )
        else:
            g_l, g_c, finite = self._batch_gradients(
                losses, controls, groups, batch, active, pg, chunks
            )
            beta, upd = self._beta(), None
        with torch.no_grad():
            ctl = g_l - (self._expand(beta) * g_c).sum(0)  # [P] controlled gradient
            if not self._per_sample:  # NaN/Inf in g_ℓ or any g_c reaches ctl (0·Inf = NaN)
                finite = finite & all_finite(ctl)
            if self.config.nonfinite == "raise" and not bool(finite):
                raise VarRedError(
                    "losses/controls: expected finite losses, controls and gradients, got "
                    f"NaN/Inf (losses {shape_str(losses)}, controls {shape_str(controls)})"
                )
            out = ctl
            if self.config.nonfinite == "zero":
                out = torch.where(finite, ctl, torch.zeros_like(ctl))
            self._write_grads(out if self._scale is None else out * self._scale)
            self._update(g_l, g_c, finite, upd)
            if not self._per_sample:
                if not isinstance(self.config.coefficient, str):
                    ready = torch.ones_like(ready)
                self._update_track(ctl, g_l, finite & ready)
            return self._diagnostics(beta, g_l, g_c, out, finite)

    def _write_grads(self, out: Tensor) -> None:
        """Split the flat ``[P]`` gradient into every ``p.grad`` (one fused copy)."""
        views = [o.view(p.shape) for o, p in zip(out.split(self._sizes), self.params)]
        dst, src = [], []
        for p, v in zip(self.params, views):
            if p.grad is None or p.grad.shape != p.shape or p.grad.dtype != p.dtype:
                p.grad = torch.empty_like(p, memory_format=torch.contiguous_format)
            dst.append(p.grad)
            src.append(v)
        torch._foreach_copy_(dst, src)

    def _scale_of(self, scaler: Any) -> Tensor:
        """The scaler's current scale ``S`` as a ``[]`` tensor (statistics dtype; no sync)."""
        fn = getattr(scaler, "scale", None)
        if not callable(fn):
            raise VarRedError(
                f"scaler: expected a torch.amp.GradScaler (or None), got {type(scaler).__name__}"
            )
        one = torch.ones((), dtype=torch.float32, device=self._device)
        return fn(one).to(self._dtype)

    def _from_chunks(
        self, losses: Tensor, chunks: Any, groups: Tensor | None
    ) -> tuple[list[Tensor], Tensor, Tensor]:
        """Per-group controls → (chunks, ``[B]`` concatenation, ``[B]`` group index); no sync."""
        ng = self.config.num_groups
        try:
            parts = list(chunks)
        except TypeError:
            raise VarRedError(
                f"controls: expected a tensor [B] or a sequence of {ng} tensors (one per group), "
                f"got {type(chunks).__name__}"
            ) from None
        if len(parts) != ng:
            raise VarRedError(
                f"controls: expected {ng} per-group tensors (num_groups), got {len(parts)}"
            )
        if groups is not None:
            raise VarRedError(
                "groups: expected None when controls are split by group (the split defines "
                f"the groups), got {shape_str(groups)}"
            )
        for i, c in enumerate(parts):
            check_floating(f"controls[{i}]", c)
            if c.dim() != 1:
                raise VarRedError(
                    f"controls[{i}]: expected a 1-D tensor [n_{i}], got {shape_str(c)}"
                )
        sizes = [c.shape[0] for c in parts]
        if not isinstance(losses, Tensor) or losses.dim() != 1 or sum(sizes) != losses.shape[0]:
            raise VarRedError(
                f"controls: expected per-group sizes summing to the batch size of losses "
                f"{shape_str(losses)}, got sizes {sizes}"
            )
        dev = losses.device
        idx = torch.cat(
            [torch.full((n,), g, dtype=torch.long, device=dev) for g, n in enumerate(sizes)]
        )  # fill kernels, no host→device copy
        return parts, torch.cat(parts), idx  # cat promotes mixed dtypes

    def _check_inputs(self, losses: Tensor, controls: Tensor, groups: Tensor | None) -> int:
        check_floating("losses", losses)
        check_floating("controls", controls)
        if losses.dim() != 1 or losses.shape[0] == 0:
            raise VarRedError(
                f"losses: expected a non-empty 1-D tensor [B], got {shape_str(losses)}"
            )
        if controls.shape != losses.shape:
            raise VarRedError(
                f"controls: expected shape {shape_str(losses)} (like losses), got {shape_str(controls)}"
            )
        if not losses.requires_grad:
            raise VarRedError(
                "losses: expected values that depend on params (requires_grad=True), "
                "got requires_grad=False"
            )
        b = losses.shape[0]
        if groups is not None:
            if not isinstance(groups, Tensor) or groups.is_floating_point() or groups.is_complex():
                got = groups.dtype if isinstance(groups, Tensor) else type(groups).__name__
                raise VarRedError(f"groups: expected an integer tensor [B], got {got}")
            if groups.shape != (b,):
                raise VarRedError(f"groups: expected shape [{b}], got {shape_str(groups)}")
            if self.config.validate:
                lo, hi = int(groups.min()), int(groups.max())
                if lo < 0 or hi >= self.config.num_groups:
                    raise VarRedError(
                        f"groups: expected values in [0, {self.config.num_groups}), "
                        f"got min {lo} and max {hi}"
                    )
        return b

    def _group(self) -> tuple[bool, Any]:
        pg = self.process_group
        if pg is None:
            return False, None
        if isinstance(pg, str):
            if not (dist.is_available() and dist.is_initialized()):
                raise VarRedError(
                    "process_group: expected an initialised torch.distributed for 'default', "
                    "got an uninitialised one"
                )
            return True, None
        return True, pg

    def _grads(
        self, out: Tensor, w: Tensor, batched: bool, retain: bool, name: str | None = None
    ) -> Tensor:
        """:func:`~varred.flat_grad.flat_grad` of ``out`` weighted by ``w`` (``[B]`` → ``[P]``,
        or ``[R, B]`` batched rows → ``[R, P]``) in the statistics dtype, unscaled."""
        if self._scale is not None:
            w = w * self._scale.to(w.dtype)
        flat = flat_grad(
            out, self.params, w, batched=batched, retain_graph=retain, dtype=self._dtype, name=name
        )
        return flat if self._scale is None else flat / self._scale

    def _grad_rows(self, out: Tensor, w: Tensor, retain: bool, name: str | None = None) -> Tensor:
        """``[R, B]`` weight rows → ``[R, P]``: batched, looped, or ``auto`` (try, remember).

        ``auto`` falls back to the loop only when the batched pass hits a missing vmap
        batching rule (:func:`~varred.flat_grad.is_vmap_unsupported`), and remembers it.
        """
        key = name or "controls"
        choice = self._batched_choice[key]
        mode = "auto" if choice is None else ("batched" if choice else "loop")
        if self._scale is not None:
            w = w * self._scale.to(w.dtype)
        rows, used = flat_grad_rows(
            out, self.params, w, mode=mode, retain_graph=retain, dtype=self._dtype, name=name
        )
        self._batched_choice[key] = used
        return rows if self._scale is None else rows / self._scale

    def _batch_gradients(
        self, losses: Tensor, controls: Tensor, groups: Tensor | None, b: int, active: bool, pg: Any,
        chunks: list[Tensor] | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
        """Flat batch gradients ``g_ℓ [P]`` and per-group ``g_c [G, P]`` (global means), finite."""
        ng = self.config.num_groups
        scale = 1.0 if active else 1.0 / b  # sums when reducing, means otherwise
        need_c = controls.requires_grad
        g_l = self._grads(losses, torch.full_like(losses, scale), False, need_c, name="losses")
        if not need_c:
            g_c = g_l.new_zeros(ng, self._numel)
        elif chunks is not None:  # one backward per group, each over that group's graph only
            live = [j for j, c in enumerate(chunks) if c.requires_grad and c.shape[0] > 0]
            rows = [g_l.new_zeros(self._numel)] * ng
            for j in live:  # chunks may share graph parts: retain all but the last
                c = chunks[j]
                rows[j] = self._grads(c, torch.full_like(c, scale), False, j != live[-1])
            g_c = torch.stack(rows)
        elif groups is None or ng == 1:
            g_c = self._grads(controls, torch.full_like(controls, scale), False, False)[None]
            if ng > 1:
                g_c = torch.cat([g_c, g_c.new_zeros(ng - 1, self._numel)])
        else:
            onehot = groups[None, :] == torch.arange(ng, device=groups.device)[:, None]
            g_c = self._grad_rows(controls, onehot.to(controls.dtype) * scale, False)  # [G, P]
        bad = (~torch.isfinite(losses)).sum() + (~torch.isfinite(controls)).sum()
        if active:  # sums and counts over ranks, then the global means
            cnt = torch.full((1,), float(b), dtype=self._dtype, device=bad.device)
            red = self._allreduce(active, pg, [bad.to(self._dtype).view(1), cnt, g_l, g_c])
            bad, total = red[0][0], red[1][0]
            g_l, g_c = red[2] / total, red[3] / total
        return g_l, g_c, bad == 0  # gradients are checked through the controlled one

    def _allreduce(self, active: bool, pg: Any, xs: list[Tensor]) -> list[Tensor]:
        """Sum ``xs`` over the process group in one flat all-reduce (identity when inactive)."""
        if not active:
            return xs
        flat = torch.cat([x.reshape(-1) for x in xs])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=pg)
        return [y.view_as(x) for y, x in zip(flat.split([x.numel() for x in xs]), xs)]

    def _per_sample_step(
        self, losses: Tensor, controls: Tensor, groups: Tensor | None, b: int, active: bool, pg: Any
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Any]:
        """Per-sample gradients ``[B, P]`` → per (fold, group) sufficient statistics → β, grads.

        Returns ``g_l [P]``, ``g_c [L, P]`` (per fold×group sums over the global batch size),
        compact β ``[L, ·]``, ``finite`` and the batch moments to merge (``L = folds·G`` or
        ``G``).
        """
        cfg = self.config
        ng = cfg.num_groups
        k = cfg.folds if cfg.per_sample_fit == "crossfit" else 1
        dev = losses.device
        eye = torch.eye(b, dtype=losses.dtype, device=dev)
        need_c = controls.requires_grad
        gl = self._grad_rows(losses, eye, need_c, name="losses")  # [B, P]
        gc = self._grad_rows(controls, eye.to(controls.dtype), False) if need_c else gl * 0
        gi = groups.long() if groups is not None else torch.zeros(b, dtype=torch.long, device=dev)
        member = gi[None, :] == torch.arange(ng, device=dev)[:, None]  # [G, B]
        rank = (member.cumsum(1) - 1).gather(0, gi[None, :])[0]  # [B]: index within own group
        idx = (rank % k) * ng + gi  # [B], fold-major cell index; folds alternate within groups
        oh = torch.nn.functional.one_hot(idx, k * ng).T.to(self._dtype)  # [L, B]

        def gsum(x: Tensor) -> Tensor:  # [L, P] -> [G, P], sums over folds
            return x.view(k, ng, -1).sum(0)

        def m2(s2: Tensor, s1x: Tensor, s1y: Tensor, cnt: Tensor) -> Tensor:
            return s2 - safe_div(s1x * s1y, cnt[:, None])

        bad = ((~torch.isfinite(losses)).sum() + (~torch.isfinite(controls)).sum()).to(self._dtype)
        n, bad, sc, sl = self._allreduce(active, pg, [oh.sum(1), bad.view(1), oh @ gc, oh @ gl])
        bad = bad[0]
        n_g = n.view(k, ng).sum(0)  # [G]
        ncol = n_g[:, None]
        total = n.sum()
        mc, ml = safe_div(gsum(sc), ncol), safe_div(gsum(sl), ncol)  # [G, P] batch means
        dc, dl = gc - mc[gi], gl - ml[gi]  # [B, P], centred at the global group mean
        s1c, s1l, s2cc, s2cl, s2ll = self._allreduce(
            active, pg, [oh @ dc, oh @ dl, oh @ (dc * dc), oh @ (dc * dl), oh @ (dl * dl)]
        )
        a, c = gsum(s1c), gsum(s1l)
        batch = {
            "mean_c": mc + safe_div(a, ncol),
            "mean_l": ml + safe_div(c, ncol),
            "cov_cc": safe_div(m2(gsum(s2cc), a, a, n_g), ncol),
            "cov_cl": safe_div(m2(gsum(s2cl), a, c, n_g), ncol),
            "cov_ll": safe_div(m2(gsum(s2ll), c, c, n_g), ncol),
        }
        g_l = sl.sum(0) / total
        if k == 1:
            beta, g_c = self._beta(), sc / total
        else:  # fold j uses the statistics of the other folds of this batch
            n_o = (n_g[None] - n.view(k, ng)).reshape(-1)  # [L]

            def other(x: Tensor) -> Tensor:  # [L, P] -> [L, P], sums over the other folds
                return (gsum(x)[None] - x.view(k, ng, -1)).reshape(x.shape)

            cl = m2(other(s2cl), other(s1c), other(s1l), n_o)
            cc = m2(other(s2cc), other(s1c), other(s1c), n_o)
            beta, g_c = self._pool(cl, cc, n_o), sc / total
        finite = (bad == 0) & all_finite(sc) & all_finite(sl)
        return g_l, g_c, beta, finite, (batch, n_g)

    # ---------------------------------------------------------------- statistics
    def _update(self, g_l: Tensor, g_c: Tensor, finite: Tensor, upd: Any) -> None:
        """Fold this step into the statistics, unless it was non-finite (masked, no sync)."""
        st = self._stats
        state = Moments(self._weight, {"c": st["mean_c"], "l": st["mean_l"]},
                        {k: st[k] for k in _PAIRS})  # fmt: skip
        decay = float(self.config.decay)
        if upd is not None:  # per-sample batch moments: the general merge (Chan et al.)
            batch, count = upd
            bm = Moments(count, {"c": batch["mean_c"], "l": batch["mean_l"]},
                         {k: batch[k] for k in _PAIRS})  # fmt: skip
            new = merge(state, bm, _PAIRS, decay, finite)
        else:  # running: one observation (g_c, g_ℓ) per step, weight 1
            new = observe(state, {"c": g_c, "l": g_l[None]}, _PAIRS, decay, finite)
        self._stats = {"mean_c": new.mean["c"], "mean_l": new.mean["l"], **new.cov}
        self._weight = new.weight
        self._num_updates = self._num_updates + finite.long()

    def _update_track(self, ctl: Tensor, g_l: Tensor, ok: Tensor) -> None:
        """Running moments of the applied ``ctl [P]`` and plain ``g_l [P]`` step gradients.

        Only steps with ``ok`` (finite, β in use) count, each with weight 1 under ``decay``;
        the variances are kept as traces ``[]``.
        """
        t = self._track
        state = Moments(t["track_weight"].reshape(()), {"ctl": t["ctl_mean"], "plain": t["plain_mean"]},
                        {"ctl_var": t["ctl_var"], "plain_var": t["plain_var"]})  # fmt: skip
        new = observe(state, {"ctl": ctl, "plain": g_l}, _TRACK_PAIRS, float(self.config.decay), ok)
        self._track = {
            "track_weight": new.weight.reshape(1), "ctl_mean": new.mean["ctl"],
            "plain_mean": new.mean["plain"], **new.cov,
        }  # fmt: skip

    def _diagnostics(
        self, beta: Tensor, g_l: Tensor, g_c: Tensor, out: Tensor, finite: Tensor
    ) -> dict[str, Tensor]:
        st, w = self._stats, self._weight
        ng = self.config.num_groups
        vb = self._expand(beta if beta.shape[0] == ng else self._beta())  # [G, P | 1]
        cl, cc = st["cov_cl"], st["cov_cc"]
        tll = st["cov_ll"].sum(1)  # [1] (running) or [G] (per-sample)
        # [G]: tr Var(g_ℓ − β_g g_c,g) = tr Var(g_ℓ) − Σ (2β Cov − β² Var) ≥ 0 (a PSD form)
        resid = (tll - (vb * (2 * cl - vb * cc)).sum(1)).clamp(min=0)
        per_group = torch.where(tll > 0, resid / torch.where(tll > 0, tll, 1), 1.0)
        if self._per_sample:  # pooled within-group per-sample ratio
            num, den = (resid * w).sum(), (tll * w).sum()
        else:  # tracked moments of the applied vs the plain step gradient
            num, den = self._track["ctl_var"], self._track["plain_var"]
        ratio = torch.where(den > 0, num / torch.where(den > 0, den, 1), 1.0)
        return {
            "variance_ratio": ratio.to(self._dtype),
            "variance_ratio_per_group": per_group.to(self._dtype),
            "correlation": safe_div(cl.sum(1), torch.sqrt(cc.sum(1) * tll)),
            "beta_mean": beta.mean(),
            "beta_min": beta.min(),
            "beta_max": beta.max(),
            "grad_norm_loss": torch.linalg.vector_norm(g_l),
            "grad_norm_control": torch.linalg.vector_norm(g_c.sum(0)),
            "grad_norm": torch.linalg.vector_norm(out),
            "finite": finite,
            "num_updates": self._num_updates.clone(),
        }
