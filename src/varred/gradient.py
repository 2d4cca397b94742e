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

from varred.errors import VarRedError, shape_str
from varred.flat_grad import flat_grad, flat_grad_rows
from varred.gradient_config import GradientControlConfig, check_params
from varred.gradient_fit import FlatPool, fixed_beta, per_sample_fit, running_beta
from varred.gradient_inputs import (
    allreduce,
    check_inputs,
    resolve_layout,
    resolve_process_group,
    scale_of,
    split_controls,
    write_grads,
)
from varred.gradient_shards import sharded_gradients
from varred.gradient_state import ControlStatistics
from varred.layout import CoefficientLayout
from varred.moments import all_finite, merge_moments

__all__ = ["GradientControl", "GradientControlConfig", "merge_moments"]

Tensor = torch.Tensor


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
        gradient_mode: ``"autograd"``, ``"backward"`` (FSDP2 ``fully_shard``: ``1 + G``
            ``.backward()`` passes, everything per local shard; :mod:`varred.gradient_shards`,
            ``docs/gradient.md``) or ``"auto"`` (default: backward iff a parameter is sharded).

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
        gradient_mode: str = "auto",
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
        self.layout = lay = resolve_layout(layout, granularity, num_groups, shrinkage)
        self.config = GradientControlConfig(
            lay.granularity, coefficient, decay, lay.num_groups, warmup_steps, per_sample_fit,
            folds, nonfinite, nonfinite == "raise", validate, group_backward, lay.shrinkage,
        )  # fmt: skip
        if isinstance(process_group, str) and process_group != "default":
            raise VarRedError(
                f"process_group: expected None, 'default' or a ProcessGroup, got {process_group!r}"
            )
        self.params = params = check_params(params)
        self._shards = sh = sharded_gradients(gradient_mode, params, process_group, coefficient)
        self.process_group = process_group
        is64 = any(p.dtype == torch.float64 for p in self.params)
        self._dtype = torch.float64 if is64 else torch.float32
        self._device = self.params[0].device
        self._shapes = [p.shape for p in self.params] if sh is None else sh.shapes  # local
        self._sizes = [p.numel() for p in self.params] if sh is None else sh.sizes
        self._numel = sum(self._sizes)
        # [npar] segment lengths of the flat buffer, for per-tensor pooling (segment_reduce)
        lengths = torch.tensor(self._sizes, dtype=torch.long, device=self._device)
        red = () if sh is None else (sh.reduce, sh.totals)  # shards: pooled sums all-reduced
        self._pool = FlatPool(lengths, lay.granularity, lay.shrinkage, *red)
        choice = {"auto": None, "batched": True, "loop": False}[group_backward]
        self._batched_choice = {"losses": choice, "controls": choice}  # per graph; auto: None
        self._scale: Tensor | None = None  # GradScaler scale during backward(scaler=...)
        self.statistics = ControlStatistics(
            lay.num_groups, self._numel, self._per_sample, float(decay), self._dtype, self._device
        )

    # ---------------------------------------------------------------- state
    @property
    def _per_sample(self) -> bool:
        return self.config.coefficient == "per_sample"

    @property
    def num_updates(self) -> Tensor:
        """``[]`` int64: number of finite steps folded into the statistics."""
        return self.statistics.num_updates

    def reset(self) -> None:
        """Forget all statistics (β returns to 0 until the warmup is over again)."""
        self.statistics.reset()

    def _header(self) -> dict[str, Any]:
        n = self.config.num_groups
        return {"num_groups": n, "num_params": len(self.params), "num_elements": self._numel}

    def state_dict(self) -> dict[str, Any]:
        """Statistics as tensors and ints only (loadable with ``torch.load(weights_only=True)``).

        Keys: ``num_groups``, ``num_params``, ``num_elements`` (ints), ``weight``,
        ``num_updates``, the flat statistics ``mean_c``/``cov_cc``/``cov_cl`` ``[G, P]`` and
        ``mean_l``/``cov_ll`` ``[1 or G, P]``, and in running/fixed modes the tracked moments of
        the applied gradient (``track_weight``, ``ctl_mean``, ``plain_mean`` ``[P]``,
        ``ctl_var``, ``plain_var`` ``[]``).
        """
        return self.statistics.state_dict(self._header())

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore statistics saved by :meth:`state_dict` (shapes must match)."""
        self.statistics.load_state_dict(dict(state_dict), self._header())

    # ---------------------------------------------------------------- coefficients
    def _beta(self) -> Tensor:
        """β the next step applies, compact ``[G, P | npar | 1]``, detached (the fixed or the
        running strategy; per-sample cross-fitting makes its own in the step)."""
        cfg, st = self.config, self.statistics
        if not isinstance(cfg.coefficient, str):
            return fixed_beta(cfg.coefficient, cfg.num_groups, self._dtype, self._device)
        return running_beta(self._pool, st.stats, st.weight, st.num_updates >= cfg.warmup_steps)

    def coefficients(self) -> list[Tensor]:
        """Current β per parameter (what the next step applies in running modes), detached.

        Returns:
            per parameter ``[num_groups, *p.shape]`` (element) or ``[num_groups, 1, ..., 1]``.
        """
        beta = self._beta()
        g, gran = beta.shape[0], self.config.granularity
        if isinstance(self.config.coefficient, str) and gran == "element":  # [G, P]
            return [b.view(g, *s) for b, s in zip(beta.split(self._sizes, 1), self._shapes)]
        if isinstance(self.config.coefficient, str) and gran == "tensor":  # [G, npar]
            return [beta[:, i].reshape((g,) + (1,) * len(s)) for i, s in enumerate(self._shapes)]
        return [beta.view((g,) + (1,) * len(s)) for s in self._shapes]  # [G, 1]

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
        cfg, st = self.config, self.statistics
        self._scale = None if scaler is None else scale_of(scaler, self._dtype, self._device)
        groups = self.layout.index(groups)
        chunks: list[Tensor] | None = None
        if not isinstance(controls, Tensor):
            chunks, controls, groups = split_controls(losses, controls, groups, cfg.num_groups)
        batch = check_inputs(losses, controls, groups, cfg.num_groups, cfg.validate)
        active, pg = resolve_process_group(self.process_group)
        ready = st.num_updates >= cfg.warmup_steps  # β of this step is in use
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
            ctl = g_l - (self._pool.expand(beta, self._numel) * g_c).sum(0)  # [P] controlled
            if not self._per_sample:  # NaN/Inf in g_ℓ or any g_c reaches ctl (0·Inf = NaN)
                finite = finite & all_finite(ctl)
            finite = finite if self._shards is None else self._shards.agree(finite)  # all ranks
            if cfg.nonfinite == "raise" and not bool(finite):
                raise VarRedError(
                    "losses/controls: expected finite losses, controls and gradients, got "
                    f"NaN/Inf (losses {shape_str(losses)}, controls {shape_str(controls)})"
                )
            out = (
                torch.where(finite, ctl, torch.zeros_like(ctl)) if cfg.nonfinite == "zero" else ctl
            )
            write = write_grads if self._shards is None else self._shards.write
            write(self.params, self._sizes, out if self._scale is None else out * self._scale)
            st.update(g_l, g_c, finite, upd)
            if not self._per_sample:
                if not isinstance(cfg.coefficient, str):
                    ready = torch.ones_like(ready)
                st.update_track(ctl, g_l, finite & ready)
            vb = beta if beta.shape[0] == cfg.num_groups else self._beta()
            return st.diagnostics(beta, self._pool.expand(vb, self._numel), g_l, g_c, out, finite)

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
        if self._shards is not None:  # FSDP2: local shards of global means by backward passes
            return self._shards.batch_gradients(
                losses, controls, groups, ng, chunks, self._scale, self._dtype
            )
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
            red = allreduce(active, pg, [bad.to(self._dtype).view(1), cnt, g_l, g_c])
            bad, total = red[0][0], red[1][0]
            g_l, g_c = red[2] / total, red[3] / total
        return g_l, g_c, bad == 0  # gradients are checked through the controlled one

    def _per_sample_step(
        self, losses: Tensor, controls: Tensor, groups: Tensor | None, b: int, active: bool, pg: Any
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Any]:
        """Per-sample gradient rows ``[B, P]``, then :func:`~varred.gradient_fit.per_sample_fit`."""
        cfg = self.config
        dev = losses.device
        eye = torch.eye(b, dtype=losses.dtype, device=dev)
        need_c = controls.requires_grad
        gl = self._grad_rows(losses, eye, need_c, name="losses")  # [B, P]
        gc = self._grad_rows(controls, eye.to(controls.dtype), False) if need_c else gl * 0
        gi = groups.long() if groups is not None else torch.zeros(b, dtype=torch.long, device=dev)
        bad = (~torch.isfinite(losses)).sum() + (~torch.isfinite(controls)).sum()
        k = cfg.folds if cfg.per_sample_fit == "crossfit" else 1
        return per_sample_fit(
            gl, gc, gi, cfg.num_groups, k, bad, self._pool, self._beta,
            lambda xs: allreduce(active, pg, xs),
        )  # fmt: skip
