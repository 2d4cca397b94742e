"""Per-sample and per-unit DSM gradients and their streaming moments, at a fixed θ.

The building blocks of :func:`varred_diffusion.gradient_variance_ratio`: gradients of
weighted per-sample losses/controls (one backward per sample or per unit), the additive
sufficient statistics :class:`GradientMoments` of unit gradients ``g`` and binned control
gradients ``h_b`` (centred, float64, never the ``[N, P]`` matrix), the variance-minimising β of each
kind (``unit``, ``scalar``, ``element``, ``bin``) and ``tr Cov[g − Σ_b β_b ⊙ h_b]``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from varred.errors import VarRedError
from varred.flat_grad import flat_grad, flat_grad_rows, is_vmap_unsupported
from varred.moments import Moments, batch_moments, covariance, empty_moments, merge
from varred.vocabulary import BetaLayout, canonical

__all__ = [
    "COEFFICIENT_KINDS",
    "GradientMoments",
    "controlled_variance",
    "fit_coefficients",
    "per_sample_gradients",
    "unit_gradients",
    "weighted_gradients",
]

COEFFICIENT_KINDS = ("unit", "scalar", "element", "bin")  # "bin" = BetaLayout.FULL over bins
_LAYOUTS = (BetaLayout.UNIT, BetaLayout.SCALAR, BetaLayout.ELEMENT, BetaLayout.FULL)
Tensor = torch.Tensor
ValueFn = Callable[[Callable[[Tensor, Tensor], Tensor], Tensor, Tensor, Tensor], Tensor]


def weighted_gradients(
    values: Tensor, params: Sequence[Tensor], weights: Tensor, *, retain_graph: bool = True
) -> Tensor:
    """Gradients of ``Σ_i weights[k, i] · values[i]`` for every row ``k``.

    One batched backward (``is_grads_batched``); a loop of backwards only if an operation has
    no vmap batching rule (:func:`varred.flat_grad.flat_grad_rows`).

    Args:
        values: ``[B]`` differentiable per-sample values.
        params: the parameters to differentiate (``P`` elements in total).
        weights: ``[K, B]``; ``torch.eye(B)`` gives per-sample gradients.

    Returns:
        ``[K, P]`` flattened gradients (float64); parameters outside the graph give zeros.
    """
    rows, _ = flat_grad_rows(
        values, list(params), weights, retain_graph=retain_graph, dtype=torch.float64
    )
    return rows


def per_sample_gradients(
    model: nn.Module,
    value_fn: ValueFn,
    x: Tensor,
    sigma: Tensor,
    noise: Tensor,
    *,
    method: str = "auto",
) -> Tensor:
    """Per-sample gradients ``∇_θ value_fn(model, x_i, σ_i, ε_i)`` as ``[B, P]`` (float64).

    ``method="vmap"``: ``torch.func.functional_call`` + ``vmap(grad(...))`` over samples
    (each sample evaluated as a batch of one); ``"batched"``: one forward on the whole batch
    and a batched backward (:func:`weighted_gradients` with the identity); ``"auto"`` tries
    vmap and falls back to batched (e.g. when ``value_fn`` validates its inputs with
    data-dependent Python control flow, which vmap cannot trace).

    Args:
        model: score model, ``model(x [B, ...], sigma [B]) -> [B, ...]``.
        value_fn: ``(score_fn, x, sigma, noise) -> [B]`` per-sample values, e.g.
            ``varred_diffusion.dsm_loss``.
        x, noise: ``[B, ...]``; sigma: ``[B]``.
        method: "auto", "vmap" or "batched".

    Returns:
        ``[B, P]`` gradients, parameters flattened in ``model.named_parameters()`` order.
    """
    if method not in ("auto", "vmap", "batched"):
        raise VarRedError(f"method: expected 'auto', 'vmap' or 'batched', got {method!r}")
    named = {k: v for k, v in model.named_parameters() if v.requires_grad}
    if method in ("auto", "vmap"):
        from torch.func import functional_call, grad, vmap

        def one(params: dict[str, Tensor], xi: Tensor, si: Tensor, ei: Tensor) -> Tensor:
            def score_fn(xx: Tensor, ss: Tensor) -> Tensor:
                return functional_call(model, params, (xx, ss))

            return value_fn(score_fn, xi[None], si[None], ei[None]).sum()

        detached = {k: v.detach() for k, v in named.items()}
        try:
            g = vmap(grad(one), in_dims=(None, 0, 0, 0))(detached, x, sigma, noise)
            return torch.cat([g[k].reshape(x.shape[0], -1) for k in named], dim=1).double()
        except (RuntimeError, NotImplementedError) as err:  # only a vmap limitation falls back
            if method == "vmap" or not is_vmap_unsupported(err):
                raise
    values = value_fn(lambda xx, ss: model(xx, ss), x, sigma, noise)
    eye = torch.eye(x.shape[0], dtype=values.dtype, device=values.device)
    return weighted_gradients(values, list(named.values()), eye, retain_graph=False)


_PAIRS = {
    "gg": ("g", "g", "...,...->..."),  # Var g [P]
    "gh": ("g", "h", "p,bp->bp"),  # Cov(g, h_b) [nb, P]
    "hh": ("h", "h", "bp,cp->bcp"),  # Cov(h_b, h_c) [nb, nb, P]
}


def _to(m: Moments, device: torch.device) -> Moments:
    return Moments(m.weight.to(device), {k: v.to(device) for k, v in m.mean.items()},
                   {k: v.to(device) for k, v in m.cov.items()})  # fmt: skip


class GradientMoments:
    """Streaming centred moments of unit gradients ``g [P]`` and binned control gradients ``h [nb, P]``.

    One :class:`varred.moments.Moments` state (float64, on the gradients' device): the weight, the means of
    ``g`` and ``h_b`` and the centred ``Var g``, ``Cov(g, h_b)``, ``Cov(h_b, h_c)`` per element,
    merged batch by batch (Chan et al. 1979): enough for ``tr Cov[g − Σ_b β_b ⊙ h_b]`` with
    any β, without cancellation when the mean dominates.

    Args:
        num_params: ``P``.
        num_bins: ``nb``.
    """

    def __init__(self, num_params: int, num_bins: int = 1) -> None:
        self.num_bins = int(num_bins)
        p, nb = int(num_params), self.num_bins
        self.n = 0  # number of units added
        kw = {"dtype": torch.float64}
        self.state = empty_moments({"g": (p,), "h": (nb, p)}, _PAIRS, **kw)

    def update(self, g: Tensor, h: Tensor | None = None, weights: Tensor | None = None) -> None:
        """Add units: ``g [U, P]``, ``h [U, nb, P]`` (``None``: no control), optional unit
        ``weights [U]`` (default 1); the statistics live on ``g``'s device."""
        g = g.detach().double()
        if self.n == 0:
            self.state = _to(self.state, g.device)
        hh = (
            g.new_zeros(g.shape[0], self.num_bins, g.shape[1]) if h is None else h.detach().double()
        )
        w = None if weights is None else weights.detach().to(g)
        self.state = merge(self.state, batch_moments({"g": g, "h": hh}, _PAIRS, w), _PAIRS)
        self.n += g.shape[0]

    def covariances(self) -> tuple[Tensor, Tensor, Tensor]:
        """Unbiased ``Var g [P]``, ``Cov(g, h_b) [nb, P]``, ``Cov(h_b, h_c) [nb, nb, P]``."""
        if self.n < 2:
            raise VarRedError(f"moments: need at least 2 units, got {self.n}")
        return tuple(covariance(self.state, k, unbiased=True) for k in _PAIRS)  # type: ignore[return-value]


def fit_coefficients(
    moments: GradientMoments, kinds: Sequence[str] = COEFFICIENT_KINDS, *, ridge: float = 1e-12
) -> dict[str, Tensor]:
    """Variance-minimising β of each kind, as ``[nb, P]`` tensors (no gradient).

    ``unit``: 1; ``scalar``: ``Σ_p Cov(g, h) / Σ_p Var(h)`` with ``h = Σ_b h_b``;
    ``element``: the same per element; ``bin``: per element, ``β = Σ_hh^{-1} Cov(h, g)``
    over bins (``ridge`` × trace added to the diagonal; empty bins get β = 0).
    """
    _, cgh, chh = moments.covariances()
    nb, p = cgh.shape
    cov_tot = cgh.sum(0)  # Cov(g, Σ_b h_b): [P]
    var_tot = chh.sum((0, 1))  # Var(Σ_b h_b): [P]
    out: dict[str, Tensor] = {}
    for name in kinds:
        try:  # "full" is the shared name of "bin" (varred.vocabulary.BetaLayout)
            kind = canonical("kinds", name, _LAYOUTS)
        except VarRedError:
            raise VarRedError(
                f"kinds: expected entries of {COEFFICIENT_KINDS}, got {name!r}"
            ) from None
        if kind == "unit":
            beta = torch.ones(nb, p, dtype=torch.float64, device=cgh.device)
        elif kind == "scalar":
            den = var_tot.sum()
            b = torch.where(den > 0, cov_tot.sum() / den.clamp_min(1e-300), 0.0)  # no sync
            beta = b.expand(nb, p).clone()
        elif kind == "element":
            b = torch.where(
                var_tot > 0, cov_tot / var_tot.clamp_min(1e-300), torch.zeros_like(var_tot)
            )
            beta = b.expand(nb, p).clone()
        elif kind == "full":
            a = chh.permute(2, 0, 1)  # [P, nb, nb]
            diag = torch.diagonal(a, dim1=1, dim2=2)
            scale = diag.sum(-1, keepdim=True).clamp_min(1e-300)
            empty = diag <= 0
            a = a + torch.diag_embed(torch.where(empty, torch.ones_like(diag), ridge * scale))
            beta = torch.linalg.solve(a, cgh.T.unsqueeze(-1)).squeeze(-1).T  # [nb, P]
            beta = torch.where(empty.T, torch.zeros_like(beta), beta)
        out[name] = beta
    return out


def controlled_variance(moments: GradientMoments, beta: Tensor | None = None) -> float:
    """``tr Cov[g − Σ_b β_b ⊙ h_b]`` over the units in ``moments`` (``β = None``: plain)."""
    vg, cgh, chh = moments.covariances()
    if beta is None:
        return float(vg.sum())
    beta = beta.double()
    var = vg - 2 * (beta * cgh).sum(0) + torch.einsum("bp,bcp,cp->p", beta, chh, beta)
    return float(var.sum())


def unit_gradients(
    losses: Tensor,
    controls: Tensor | None,
    params: Sequence[Tensor],
    bin_index: Tensor | None = None,
    num_bins: int = 1,
    weights: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Gradients of one unit's estimates: ``g = ∇ Σ w_i ℓ_i`` and ``h_b = ∇ Σ_{i∈b} w_i c_i``.

    Args:
        losses, controls: ``[m]`` per-sample values of the unit (differentiable);
            ``controls=None`` gives ``h = 0``.
        params: parameters (``P`` elements).
        bin_index: ``LongTensor[m]`` σ bin of each sample (``None``: one bin).
        num_bins: number of bins ``nb``.
        weights: ``[m]`` (default ``1/m``: the unit's mean).

    Returns:
        ``g [P]`` and ``h [nb, P]`` (float64); absent bins are zero.
    """
    m = losses.shape[0]
    dev = losses.device
    w = torch.full((m,), 1.0 / m, dtype=losses.dtype, device=dev) if weights is None else weights
    w = w.to(dtype=losses.dtype, device=dev)
    g = flat_grad(
        (w * losses).sum(), params, retain_graph=controls is not None, dtype=torch.float64
    )
    if controls is None:
        return g, g.new_zeros(num_bins, g.shape[0])
    idx = torch.zeros(m, dtype=torch.long, device=dev) if bin_index is None else bin_index.long()
    onehot = idx[None, :] == torch.arange(num_bins, device=dev)[:, None]  # [nb, m], no sync
    h, _ = flat_grad_rows(controls, params, onehot.to(controls.dtype) * w.to(controls.dtype),
                          dtype=torch.float64)  # fmt: skip
    return g, h
