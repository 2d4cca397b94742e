"""``TrainingStep``: one diffusion training step composed of a recipe's four parts.

Data flow of one call (``docs/architecture.md``)::

    x, [σ], [ε] ──prepare──▶ Batch(x, σ, ε, α, λ, w, kwargs)        sampler draws σ and w;
                                  │                                    control may pair rows
                 ┌────────────────┴───────────────┐
          losses(batch): w·(λ/σ²)‖σ s(x_t) + ε̃‖²   controls(batch): w·C (zero mean)
          (target gives ε̃; learned weighting      (per group when the layout has σ bins:
           adds its regulariser)                   sorted batch, one control forward each)
                 └────────────────┬───────────────┘
          GradientControl.backward → p.grad = mean ∇ℓ − Σ_g β_g ⊙ ∇ mean_g C     (or plain)
                                  │
          sampler.update(σ, ℓ)  (adaptive samplers)  → diagnostics
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from varred.errors import VarRedError, check_finite, check_floating, shape_str
from varred.gradient import GradientControl
from varred_diffusion.batch import Batch
from varred_diffusion.broadcast import per_sample
from varred_diffusion.losses import dsm_residual_loss, loss_weights

__all__ = ["TrainingStep"]


def _at_least_float32(t: Tensor) -> Tensor:
    """Statistics in float32 at least (autocast may give bf16 / fp16 per-sample values)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


class TrainingStep:
    """Compose a noise-level sampler, a weighting, a target and a control into one step.

    ``step(x)`` (or ``step(x, sigma, noise)``) overwrites every ``p.grad`` with the recipe's
    gradient and returns detached diagnostics; any ``torch.optim`` optimizer does the rest.
    With every part trivial it is plain DSM, bit for bit: ``dsm_loss(...).mean().backward()``.

    Args:
        score_fn: ``score_fn(x_t [N, ...], sigma [N], **score_kwargs) -> [N, ...]``; rows
            independent (no batch statistics) when a control is used.
        params: the parameters whose ``.grad`` is written (include a learned weighting's).
        sampler: a ``NoiseLevelSampler`` (draws σ and importance weights when the call
            gives no σ), or ``None``.
        weighting: λ(σ): ``None`` (σ²), a float, a ``[B]`` tensor, or a callable; a callable
            with ``regulariser(sigma)`` (EDM2's learned uncertainty) adds it to the loss.
        target: ``target(x, sigma, noise, alpha, xt) -> ε̃`` or ``None`` (ε).
        control: ``TaylorControl``, ``AntitheticPairs`` or ``None``.
        coefficients: the ``varred.GradientControl`` that fits and applies β (its layout:
            granularity × groups × shrinkage); default ``GradientControl(params)`` when the
            control needs one.
        alpha: signal scale (VP, flow matching): float, ``[B]`` tensor or callable
            ``sigma [B] -> alpha [B]``; ``None`` = 1 (VE).
        validate: check inputs at this entry point (host syncs); the cores below never do.

    Raises:
        VarRedError: no trainable parameters; a part of the wrong kind; a ``stack``ed
            control with a split group forward over several groups.

    Example:
        >>> import varred_diffusion as vd
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
        >>> step = vd.TrainingStep(lambda y, s: net(y), net.parameters(),
        ...                        control=vd.TaylorControl(order=0))
        >>> g = torch.Generator().manual_seed(0)
        >>> diag = step(torch.randn(8, 2, generator=g), torch.full((8,), 0.1),
        ...             torch.randn(8, 2, generator=g))
    """

    def __init__(
        self,
        score_fn: Callable[..., Tensor],
        params: Iterable[torch.nn.Parameter],
        *,
        sampler: Any = None,
        weighting: Any = None,
        target: Any = None,
        control: Any = None,
        coefficients: GradientControl | None = None,
        alpha: Callable[[Tensor], Tensor] | Tensor | float | None = None,
        validate: bool = True,
    ) -> None:
        self.score_fn = score_fn
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise VarRedError(
                "params: expected at least one parameter with requires_grad, got none"
            )
        self.sampler, self.weighting, self.target = sampler, weighting, target
        self.control, self.alpha, self.validate = control, alpha, bool(validate)
        if control is not None and not callable(getattr(control, "values", None)):
            raise VarRedError(
                f"control: expected a control part with values(...), got {type(control).__name__}"
            )
        needs = control is not None and getattr(control, "needs_coefficients", True)
        if needs and coefficients is None:
            coefficients = GradientControl(self.params, validate=self.validate)
        if coefficients is not None and not isinstance(coefficients, GradientControl):
            raise VarRedError(
                f"coefficients: expected a varred.GradientControl, got {type(coefficients).__name__}"
            )
        self.coefficients = coefficients if needs else None
        #: ``None`` or bool ``[G]``: groups whose control is formed (split path); the others get
        #: no control forward and contribute a zero control (``AutoStep`` switches them).
        self.active_groups: Tensor | None = None
        if self.num_groups > 1 and getattr(control, "stack", False) and self._split:
            raise VarRedError(
                "stack: the stacked forward runs over the whole batch, so it needs "
                "group_forward='joint' when the layout has several groups"
            )

    # ------------------------------------------------------------------ layout
    @property
    def num_groups(self) -> int:
        """Coefficient groups of the layout (1 without a control)."""
        return 1 if self.coefficients is None else int(self.coefficients.config.num_groups)

    @property
    def _split(self) -> bool:
        return getattr(self.control, "group_forward", "joint") == "split"

    def group_index(self, sigma: Tensor) -> Tensor | None:
        """The layout's group of each σ ``LongTensor[B]`` (its grouping's ``index``), or ``None``."""
        layout = getattr(self.coefficients, "layout", None)
        grouping = getattr(layout, "groups", None)
        index = getattr(grouping, "index", None)
        return None if index is None else index(sigma).to(torch.long)

    # ------------------------------------------------------------------ parts
    def prepare(
        self,
        x: Tensor,
        sigma: Tensor | float | None = None,
        noise: Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
        score_kwargs: Mapping[str, Any] | None = None,
    ) -> Batch:
        """Resolve and check one batch: draw σ (sampler) and ε when not given, pair rows."""
        check_floating("x", x)
        if x.ndim < 2:
            raise VarRedError(
                f"x: expected shape [B, ...] with at least 2 dims, got {shape_str(x)}"
            )
        if self.validate and (
            self.coefficients is None or getattr(self.control, "requires_finite_data", False)
        ):  # else a NaN batch reaches GradientControl's nonfinite policy, which skips it
            check_finite("x", x)
        pairs = callable(getattr(self.control, "pair", None))
        if pairs:
            x, sigma = self.control.pair(x, sigma if isinstance(sigma, Tensor) else None)
        b, weight = x.shape[0], None
        if sigma is None:
            if self.sampler is None:
                raise VarRedError("sigma: expected noise levels [B] or a sampler, got neither")
            n = b // 2 if pairs else b
            sigma, weight = self.sampler.sample(n, generator, dtype=x.dtype, device=x.device)
            if pairs:
                sigma, weight = torch.cat([sigma, sigma]), torch.cat([weight, weight])
        sig = per_sample("sigma", sigma, b, x)
        if self.validate:
            check_finite("sigma", sig)
            if bool((sig <= 0).any()):
                raise VarRedError(f"sigma: expected values > 0, got min {float(sig.min()):.3g}")
        if noise is None:
            if generator is None:
                raise VarRedError(
                    "noise: expected ε [B, ...] or a generator to draw it, got neither"
                )
            draw = getattr(self.control, "noise", None) if pairs else None
            noise = (
                draw(x, generator)
                if draw
                else torch.randn(
                    x.shape, generator=generator, dtype=x.dtype, device=generator.device
                )
            ).to(x.device)  # drawn where the generator lives (CPU or CUDA), then moved
        check_floating("noise", noise)
        if noise.shape != x.shape:
            raise VarRedError(
                f"noise: expected the shape of x {shape_str(x)}, got {shape_str(noise)}"
            )
        a = self.alpha(sig) if callable(self.alpha) else self.alpha
        alpha = per_sample("alpha", a, b, x, 1.0)
        lam = None if self.weighting is None else loss_weights(self.weighting, sig)
        if weight is not None:
            weight = per_sample("weight", weight, b, x)
        return Batch(x, sig, noise.to(x.dtype), alpha, lam, weight, dict(score_kwargs or {}))

    def losses(self, batch: Batch, score: Tensor | None = None) -> Tensor:
        """Per-sample losses ``[B]``: ``(λ/σ²)‖σ s(x_t) + ε̃‖² (+ regulariser)``, unweighted.

        The step multiplies them (and the controls) by the sampler's importance weights.
        """
        if score is None:
            score = self.score_fn(batch.xt, batch.sigma, **batch.score_kwargs)
        if not isinstance(score, Tensor) or score.shape != batch.x.shape:
            raise VarRedError(
                f"score_fn: expected an output of the shape of x {shape_str(batch.x)}, "
                f"got {shape_str(score)}"
            )
        eps = batch.noise
        if self.target is not None:
            eps = self.target(batch.x, batch.sigma, batch.noise, batch.alpha, batch.xt)
        loss = dsm_residual_loss(score, eps, batch.sigma, batch.lam)
        reg = getattr(self.weighting, "regulariser", None)
        if callable(reg):
            loss = loss + reg(batch.sigma).to(loss.dtype)
        return loss

    def controls(self, batch: Batch, generator: torch.Generator | None = None) -> Tensor:
        """Per-sample control values ``C`` ``[B]`` (zero mean, unweighted)."""
        return self.control.values(self.score_fn, batch, generator)

    def losses_and_controls(
        self, batch: Batch, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """``(losses [B], controls [B])`` over the whole batch (the stacked forward if asked)."""
        if getattr(self.control, "stack", False):
            score, ctrl = self.control.stacked_forward(self.score_fn, batch)
            return self.losses(batch, score), ctrl
        return self.losses(batch), self.controls(batch, generator)

    # ------------------------------------------------------------------ step
    def step(
        self,
        x: Tensor,
        sigma: Tensor | float | None = None,
        noise: Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
        groups: Tensor | None = None,
        score_kwargs: Mapping[str, Any] | None = None,
        scaler: Any = None,
    ) -> dict[str, Tensor]:
        """Fill ``p.grad`` (overwriting) for one batch; return diagnostics (tensors).

        Args:
            x: clean data ``[B, ...]``.
            sigma: noise levels ``[B]`` or a float; ``None`` draws them from the sampler.
            noise: ε ``[B, ...]``; ``None`` draws it from ``generator``.
            generator: for σ, ε and the control's probes when they are drawn here.
            groups: ``LongTensor[B]`` coefficient group per sample (any grouping of the
                user's, values in ``[0, num_groups)``); default: the layout's grouping of σ.
            score_kwargs: extra keyword arguments of ``score_fn``.
            scaler: a ``torch.amp.GradScaler``: ``p.grad`` holds the scaled gradient.

        Returns:
            ``"loss"`` (mean importance-weighted loss, float32), ``"sigma"`` ``[B]`` and, with a
            coefficient-fitting control, ``GradientControl``'s diagnostics.
        """
        batch = self.prepare(x, sigma, noise, generator=generator, score_kwargs=score_kwargs)
        if self.coefficients is None:
            for p in self.params:
                p.grad = None
            loss = self.losses(batch)
            mean = batch.weighted(loss).mean()
            (mean if scaler is None else scaler.scale(mean)).backward()
            diag: dict[str, Tensor] = {}
        else:
            if groups is None:
                groups = self.group_index(batch.sigma)
            if groups is not None and self.num_groups > 1 and self._split:
                lw, chunks, batch, loss = self._split_by_group(batch, groups, generator)
                diag = dict(self.coefficients.backward(lw, chunks, scaler=scaler))
            else:
                loss, ctrl = self.losses_and_controls(batch, generator)
                lw, cw = batch.weighted(loss), batch.weighted(ctrl)
                lw, cw = _at_least_float32(lw), _at_least_float32(cw)
                diag = dict(self.coefficients.backward(lw, cw, groups=groups, scaler=scaler))
        update = getattr(self.sampler, "update", None)
        if callable(update):
            update(batch.sigma, loss.detach())
        diag["loss"] = batch.weighted(loss.detach()).mean().float()
        diag["sigma"] = batch.sigma.detach()
        return diag

    __call__ = step

    def _split_by_group(
        self, batch: Batch, groups: Tensor, generator: torch.Generator | None
    ) -> tuple[Tensor, list[Tensor], Batch, Tensor]:
        """Weighted losses ``[B]`` of the batch sorted by group (one forward), each group's
        weighted controls, the sorted batch and its unweighted losses."""
        b, ng = batch.size, self.num_groups
        if not isinstance(groups, Tensor) or groups.is_floating_point() or groups.shape != (b,):
            got = shape_str(groups) if isinstance(groups, Tensor) else type(groups).__name__
            raise VarRedError(f"groups: expected an integer tensor of shape [{b}], got {got}")
        counts = torch.bincount(groups.clamp(min=-1) + 1, minlength=ng + 1).tolist()  # sync
        if len(counts) > ng + 1 or counts[0] > 0:
            lo, hi = int(groups.min()), int(groups.max())
            raise VarRedError(f"groups: expected values in [0, {ng}), got min {lo} and max {hi}")
        batch = batch.rows(torch.argsort(groups, stable=True))  # every per-sample tensor follows
        loss = self.losses(batch)
        chunks, lo = [], 0
        active = None if self.active_groups is None else self.active_groups.tolist()
        for g, n in enumerate(counts[1:]):
            cut, lo = slice(lo, lo + n), lo + n
            if n == 0 or (active is not None and not active[g]):
                chunks.append(loss.new_zeros(n))  # empty or switched off: no control forward
                continue
            part = batch.rows(cut)
            chunks.append(_at_least_float32(part.weighted(self.controls(part, generator))))
        return _at_least_float32(batch.weighted(loss)), chunks, batch, loss

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """State of the stateful parts: coefficients, sampler, learned weighting."""
        sd: dict[str, Any] = {}
        for name in ("coefficients", "sampler", "weighting"):
            part = getattr(self, name)
            if callable(getattr(part, "state_dict", None)):
                sd[name] = part.state_dict()
        return sd

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        for name, sub in state.items():
            part = getattr(self, name, None)
            if not callable(getattr(part, "load_state_dict", None)):
                raise VarRedError(f"state: key {name!r} has no stateful part in this step")
            part.load_state_dict(sub)
