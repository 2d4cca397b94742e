"""``ControlledDSM``: one call per training step for a DSM loss with a Taylor control variate.

Computes the per-sample DSM losses ``ℓ_i`` and the zero-mean controls ``C^k_i``
(``dsm_taylor_cv``, Jeha et al., 2024), then lets ``varred.GradientControl`` fill
``p.grad = mean ∇ℓ - Σ_g β_g ⊙ ∇(Σ_{i∈g} C_i / B)`` with coefficients per element,
tensor or scalar and, with ``bins``, per log-σ bin. The caller then runs any
``torch.optim`` optimizer step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from varred.errors import VarRedError, check_floating, check_order, shape_str
from varred.gradient import GradientControl
from varred_diffusion.losses import dsm_loss
from varred_diffusion.schedules import per_sample
from varred_diffusion.taylor_cv import (
    Weighting,
    _bcast,
    _repeat_kwargs,
    _weights,
    dsm_taylor_cv,
    resolve_expectation,
)

__all__ = ["ControlledDSM"]

Alpha = Callable[[Tensor], Tensor] | Tensor | float | None


def _bin_index(bins: Any, sigma: Tensor) -> Tensor:
    """Bin index ``LongTensor[B]`` of each σ from a ``SigmaBins``-like object."""
    fn = getattr(bins, "index", None)
    idx = fn(sigma) if callable(fn) else bins(sigma)
    return idx.to(torch.long)


def _at_least_float32(t: Tensor) -> Tensor:
    """Statistics in float32 at least (autocast may give bf16 / fp16 per-sample values)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _take_rows(kwargs: Mapping[str, Any], rows: Tensor | slice, b: int) -> dict[str, Any]:
    """Index the keyword tensors whose first dimension is the batch ``b`` by ``rows``."""
    return {
        k: v[rows] if isinstance(v, Tensor) and v.ndim >= 1 and v.shape[0] == b else v
        for k, v in kwargs.items()
    }


def _num_bins(bins: Any) -> int:
    for name in ("num_bins", "num_groups"):
        if hasattr(bins, name):
            return int(getattr(bins, name))
    return len(bins)


class ControlledDSM:
    """Denoising score matching step with a Taylor control variate on the gradient.

    Args:
        score_fn: ``score_fn(x [N, ...], sigma [N], **score_kwargs) -> [N, ...]``.
        params: the parameters whose ``.grad`` is filled (e.g. ``model.parameters()``).
        order: Taylor order ``k`` of ``C^k`` (0: derivative-free, one extra half batch).
        coefficient: ``"running"`` (β from earlier steps' statistics), ``"per_sample"``
            or a fixed float β (then equal to backpropagating ``mean(ℓ - β C)``).
        granularity: ``"element"``, ``"tensor"`` or ``"scalar"`` β.
        bins: optional ``SigmaBins``: one β per log-σ bin (C^k scales like 1/σ).
        expectation: mean of the CV: "auto", "exact", "probe" or "hutchinson".
        weighting: λ(σ) (see ``dsm_taylor_cv``; default σ²).
        alpha: signal scale: float, ``[B]`` tensor or callable ``sigma [B] -> alpha [B]``.
        enabled: ``False`` gives the plain DSM gradient, bit for bit.
        decay: running-statistics decay passed to ``GradientControl``.
        stack: k = 0 only: ``True`` runs one forward on ``[αx + σε ; αx]`` (fewer, larger
            kernels); ``False`` (default) two forwards of ``B``, so each of GradientControl's
            two backward passes covers ``B`` rows instead of ``2B``: same time on an H100,
            2.1× instead of 2.5× the plain step's memory (docs/diffusion.md).
        validate: input checks with host syncs in ``dsm_loss``, ``dsm_taylor_cv`` and
            ``GradientControl`` (its groups range check); ``False`` makes the step sync-free.
        group_forward: with σ bins (or ``groups``), how the per-bin control gradients are
            formed. ``"split"``: the batch is sorted by bin, the losses take one forward and
            the controls one forward per bin, so each bin's control backward covers only its
            own rows (about one backward in all; one host sync per step for the bin sizes).
            ``"joint"``: one forward over the batch and ``G`` backward passes over all of it
            (batched with vmap where possible; sync-free). ``"auto"`` (default): ``"split"``
            when GradientControl validates groups (a sync anyway), else ``"joint"``. Same
            gradient either way (up to summation order); costs: ``benchmarks/train_step.py``.
        control_kwargs: further keyword arguments for ``GradientControl`` (its default
            ``group_backward="auto"`` falls back to one backward per σ bin where vmap over a
            backward through forward-mode AD fails, e.g. GroupNorm under jvp in torch 2.13).

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
        >>> step = ControlledDSM(lambda y, s: net(y), net.parameters(), order=0)
        >>> opt = torch.optim.Adam(net.parameters())
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(8, 2, generator=g)
        >>> sigma = torch.full((8,), 0.1)
        >>> diag = step(x, sigma, torch.randn(8, 2, generator=g))
        >>> opt.step()
    """

    def __init__(
        self,
        score_fn: Callable[..., Tensor],
        params: Iterable[torch.nn.Parameter],
        *,
        order: int = 0,
        coefficient: str | float = "running",
        granularity: str = "element",
        bins: Any = None,
        expectation: str = "auto",
        weighting: Weighting = None,
        alpha: Alpha = None,
        enabled: bool = True,
        decay: float = 0.99,
        stack: bool = False,
        validate: bool = True,
        group_forward: str = "auto",
        control_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        self.score_fn = score_fn
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise VarRedError(
                "params: expected at least one parameter with requires_grad, got none"
            )
        self.order = check_order(order)
        resolve_expectation(expectation, self.order, 1)  # validates the name / order pair
        self.expectation = expectation
        self.weighting = weighting
        self.alpha = alpha
        self.enabled = bool(enabled)
        self.bins = bins
        self.stack = bool(stack)
        self.validate = bool(validate)
        if group_forward not in ("auto", "split", "joint"):
            raise VarRedError(
                f"group_forward: expected 'auto', 'split' or 'joint', got {group_forward!r}"
            )
        num_groups = 1 if bins is None else _num_bins(bins)
        extra = dict(control_kwargs or {})
        extra.setdefault("validate", self.validate)
        self.control = GradientControl(
            self.params,
            granularity=granularity,
            coefficient=coefficient,
            decay=decay,
            num_groups=num_groups,
            **extra,
        )
        if group_forward == "auto":  # split syncs once per step, as the groups check does
            group_forward = "split" if self.control.config.validate else "joint"
        self.group_forward = group_forward

    def _alpha(self, sigma: Tensor) -> Tensor | None:
        if self.alpha is None:
            return None
        if callable(self.alpha):
            return self.alpha(sigma)
        return per_sample("alpha", self.alpha, sigma.shape[0], sigma, None)

    def _plain_kwargs(self, alpha: Tensor | None, score_kwargs: Mapping[str, Any] | None) -> dict:
        kw: dict[str, Any] = {"validate": self.validate}
        if self.weighting is not None:
            w = self.weighting
            kw["weighting"] = w if callable(w) else (lambda s: _weights(w, s))
        if alpha is not None:
            kw["alpha"] = alpha
        if score_kwargs:
            kw["score_kwargs"] = score_kwargs
        return kw

    def losses_and_controls(
        self,
        x: Tensor,
        sigma: Tensor,
        noise: Tensor,
        *,
        generator: torch.Generator | None = None,
        score_kwargs: Mapping[str, Any] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Per-sample DSM losses and controls ``([B], [B])``, both differentiable in θ.

        For k = 0 both come from the score at ``αx + σε`` and at ``αx`` (one stacked
        forward with ``stack=True``); for k ≥ 1 the loss and ``dsm_taylor_cv`` are
        separate calls.
        """
        check_floating("x", x)
        sig = per_sample("sigma", sigma, x.shape[0], x, None)
        return self._losses_controls(x, sig, noise, self._alpha(sig), generator, score_kwargs)

    def _control(
        self,
        x: Tensor,
        sig: Tensor,
        noise: Tensor,
        alpha: Tensor | None,
        generator: torch.Generator | None,
        score_kwargs: Mapping[str, Any] | None,
    ) -> Tensor:
        """Per-sample ``C^k`` ``[B]`` from :func:`dsm_taylor_cv` with this step's settings."""
        return dsm_taylor_cv(
            self.score_fn,
            x,
            sig,
            noise,
            order=self.order,
            weighting=self.weighting,
            alpha=alpha,
            expectation=self.expectation,
            generator=generator,
            score_kwargs=score_kwargs,
            validate=self.validate,
        )

    def _losses_controls(
        self,
        x: Tensor,
        sig: Tensor,
        noise: Tensor,
        alpha: Tensor | None,
        generator: torch.Generator | None,
        score_kwargs: Mapping[str, Any] | None,
    ) -> tuple[Tensor, Tensor]:
        """:meth:`losses_and_controls` for per-sample ``sig [B]`` and ``alpha [B]``/None."""
        b = x.shape[0]
        if self.order > 0:
            loss = dsm_loss(self.score_fn, x, sig, noise, **self._plain_kwargs(alpha, score_kwargs))
            return loss, self._control(x, sig, noise, alpha, generator, score_kwargs)
        if noise.shape != x.shape:
            raise VarRedError(
                f"noise: expected the shape of x {shape_str(x)}, got {shape_str(noise)}"
            )
        a = per_sample("alpha", 1.0 if alpha is None else alpha, b, x, None)
        x0 = _bcast(a, x) * x  # [B, ...]
        xt = x0 + _bcast(sig, x) * noise
        if self.stack:
            kw = _repeat_kwargs(dict(score_kwargs or {}), b, 2)
            out = self.score_fn(torch.cat([xt, x0]), sig.repeat(2), **kw)  # [2B, ...]
            s_t, s_0 = out[:b], out[b:]
        else:
            kw = dict(score_kwargs or {})
            s_t, s_0 = self.score_fn(xt, sig, **kw), self.score_fn(x0, sig, **kw)
        if s_t.shape != x.shape or s_0.shape != x.shape:
            raise VarRedError(
                f"score_fn: expected an output of the shape of x {shape_str(x)}, got {shape_str(s_t)}"
            )
        d = x[0].numel()
        dtype = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(device_type=x.device.type, enabled=False):
            # the numerics of dsm_loss: (λ/σ²) ‖σ s + ε‖², statistics in >= float32
            sd, nz = _bcast(sig.to(dtype), x), noise.to(dtype)
            loss = (sd * s_t.to(dtype) + nz).pow(2).flatten(1).sum(1)  # [B]
            sig_o = sig.to(dtype)
            ratio = torch.ones_like(sig_o)  # λ/σ²
            if self.weighting is not None:
                ratio = _weights(self.weighting, sig_o) / sig_o**2
                loss = ratio * loss
            # C^0 = (λ/σ²)(2σ εᵀs(αx) + ‖ε‖² - d)
            ctrl = ratio * (
                2 * sig_o * (s_0.to(dtype) * nz).flatten(1).sum(1)
                + (nz.pow(2).flatten(1).sum(1) - d)
            )
        return loss, ctrl

    def step(
        self,
        x: Tensor,
        sigma: Tensor,
        noise: Tensor,
        *,
        generator: torch.Generator | None = None,
        groups: Tensor | None = None,
        score_kwargs: Mapping[str, Any] | None = None,
        scaler: Any = None,
    ) -> dict[str, Tensor]:
        """Fill ``p.grad`` (overwriting) for one batch; return diagnostics (tensors).

        Host syncs: none with ``validate=False`` (joint path); the split path of σ bins reads
        the bin sizes once.

        Args:
            x: clean data ``[B, ...]``.
            sigma: noise levels ``[B]`` (or a float).
            noise: ε ``[B, ...]``.
            generator: draws probes when the CV's mean needs them.
            groups: ``LongTensor[B]`` group of each sample; default: the σ-bin index
                when ``bins`` was given, else one group.
            score_kwargs: extra keyword arguments for ``score_fn``.
            scaler: a ``torch.amp.GradScaler`` (float16 training): the backward passes run on
                scaled values and ``p.grad`` holds the scaled controlled gradient, ready for
                ``scaler.step(optimizer)``; β and all statistics see unscaled gradients.

        Returns:
            ``GradientControl`` diagnostics plus ``"loss"`` (mean DSM loss, float32).
        """
        if not self.enabled:
            for p in self.params:
                p.grad = None
            sig = per_sample("sigma", sigma, x.shape[0], x, None)
            loss = dsm_loss(
                self.score_fn, x, sig, noise, **self._plain_kwargs(self._alpha(sig), score_kwargs)
            )
            mean = loss.mean()
            (mean if scaler is None else scaler.scale(mean)).backward()
            return {"loss": mean.detach().float()}
        check_floating("x", x)
        sig = per_sample("sigma", sigma, x.shape[0], x, None)
        if groups is None and self.bins is not None:
            groups = _bin_index(self.bins, sig)
        ng = self.control.config.num_groups
        if groups is not None and ng > 1 and self.group_forward == "split":
            loss, chunks = self._split_by_group(x, sig, noise, groups, generator, score_kwargs)
            diag = dict(self.control.backward(loss, chunks, scaler=scaler))
        else:
            loss, ctrl = self._losses_controls(
                x, sig, noise, self._alpha(sig), generator, score_kwargs
            )
            loss, ctrl = _at_least_float32(loss), _at_least_float32(ctrl)
            diag = dict(self.control.backward(loss, ctrl, groups=groups, scaler=scaler))
        diag["loss"] = loss.detach().mean().float()
        return diag

    def _split_by_group(
        self,
        x: Tensor,
        sig: Tensor,
        noise: Tensor,
        groups: Tensor,
        generator: torch.Generator | None,
        score_kwargs: Mapping[str, Any] | None,
    ) -> tuple[Tensor, list[Tensor]]:
        """Losses ``[B]`` sorted by group (one forward) and each group's controls (one each)."""
        b, ng = x.shape[0], self.control.config.num_groups
        if not isinstance(groups, Tensor) or groups.is_floating_point() or groups.shape != (b,):
            got = shape_str(groups) if isinstance(groups, Tensor) else type(groups).__name__
            raise VarRedError(f"groups: expected an integer tensor of shape [{b}], got {got}")
        if noise.shape != x.shape:
            raise VarRedError(
                f"noise: expected the shape of x {shape_str(x)}, got {shape_str(noise)}"
            )
        counts = torch.bincount(groups.clamp(min=-1) + 1, minlength=ng + 1).tolist()  # sync
        if len(counts) > ng + 1 or counts[0] > 0:
            lo, hi = int(groups.min()), int(groups.max())
            raise VarRedError(f"groups: expected values in [0, {ng}), got min {lo} and max {hi}")
        perm = torch.argsort(groups, stable=True)
        alpha = self._alpha(sig)
        x, sig, noise = x[perm], sig[perm], noise[perm]
        alpha = None if alpha is None else alpha[perm]
        kw = _take_rows(score_kwargs or {}, perm, b)  # per-sample keywords follow their samples
        loss = dsm_loss(self.score_fn, x, sig, noise, **self._plain_kwargs(alpha, kw))
        chunks, lo = [], 0
        for n in counts[1:]:
            cut, lo = slice(lo, lo + n), lo + n
            if n == 0:  # an empty bin: no forward, a zero-length control
                chunks.append(loss.new_zeros(0))
                continue
            a_g = None if alpha is None else alpha[cut]
            ctrl = self._control(
                x[cut], sig[cut], noise[cut], a_g, generator, _take_rows(kw, cut, b)
            )
            chunks.append(_at_least_float32(ctrl))
        return _at_least_float32(loss), chunks

    __call__ = step

    def state_dict(self) -> dict[str, Any]:
        """Running coefficient statistics (delegates to ``GradientControl``)."""
        return self.control.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""
        self.control.load_state_dict(dict(state))
