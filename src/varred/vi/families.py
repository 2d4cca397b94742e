r"""Reparameterised Gaussian variational families: :math:`z = \mu + S\varepsilon`, :math:`\varepsilon \sim N(0, I_d)`.

Mean-field (``S = diag(s)``, ``s = exp(ω)`` or ``softplus(ω)``) and full-rank (``S = L``
lower-triangular Cholesky factor with a positive diagonal through the same transform).
Entropy :math:`H(q) = \sum_i \log S_{ii} + \tfrac d2 (1 + \log 2\pi)` in closed form
(Kingma & Welling 2014; Titsias & Lázaro-Gredilla 2014 for the full-rank family).
"""

from __future__ import annotations

import math

import torch

from varred.errors import VarRedError, check_finite, check_floating, shape_str

__all__ = ["GaussianFamily"]

_KINDS = ("meanfield", "fullrank")
_TRANSFORMS = ("log", "softplus")


class GaussianFamily:
    r"""A Gaussian variational family with parameters ``loc [d]`` and ``raw_scale``.

    ``raw_scale`` is ``[d]`` (mean-field) or ``[d, d]`` (full-rank; only the lower triangle
    is used, its diagonal through the positive transform). Both are leaf tensors with
    ``requires_grad=True``, ready for a ``torch.optim`` optimiser.

    Args:
        loc: initial mean ``[d]`` (floating).
        scale: initial scale: a positive float, ``[d]`` positive standard deviations, or
            (full-rank) a ``[d, d]`` lower-triangular Cholesky factor with positive diagonal.
        kind: ``"meanfield"`` or ``"fullrank"``.
        transform: ``"log"`` (``s = exp(ω)``) or ``"softplus"`` (``s = log(1 + e^ω)``).

    Raises:
        VarRedError: non-positive or non-finite scale, bad shapes, dtype/device mismatch.

    Example:
        >>> q = GaussianFamily(torch.zeros(3, dtype=torch.float64), 0.5, kind="fullrank")
        >>> q.scale_matrix().diagonal()
        tensor([0.5000, 0.5000, 0.5000], dtype=torch.float64)
    """

    def __init__(
        self,
        loc: torch.Tensor,
        scale: float | torch.Tensor = 1.0,
        *,
        kind: str = "meanfield",
        transform: str = "log",
    ) -> None:
        if kind not in _KINDS:
            raise VarRedError(f"kind: expected one of {_KINDS}, got {kind!r}")
        if transform not in _TRANSFORMS:
            raise VarRedError(f"transform: expected one of {_TRANSFORMS}, got {transform!r}")
        check_finite("loc", check_floating("loc", loc))
        if loc.ndim != 1 or loc.shape[0] == 0:
            raise VarRedError(f"loc: expected a non-empty 1-D tensor [d], got {shape_str(loc)}")
        d = loc.shape[0]
        self.kind, self.transform, self.d = kind, transform, d
        if isinstance(scale, bool) or not isinstance(scale, (int, float, torch.Tensor)):
            raise VarRedError(f"scale: expected a positive float or tensor, got {scale!r}")
        if not isinstance(scale, torch.Tensor):
            if not (math.isfinite(scale) and scale > 0):
                raise VarRedError(f"scale: expected a positive finite float, got {scale!r}")
            scale = torch.full((d,), float(scale), dtype=loc.dtype, device=loc.device)
        check_finite("scale", check_floating("scale", scale))
        if scale.dtype != loc.dtype or scale.device != loc.device:
            raise VarRedError(
                f"scale: expected dtype {loc.dtype} on {loc.device} (like loc), "
                f"got {scale.dtype} on {scale.device}"
            )
        if scale.shape == (d, d):
            if kind != "fullrank":
                raise VarRedError(f"scale: expected [{d}] for a mean-field family, got [{d}, {d}]")
            if bool((scale.triu(1) != 0).any()):
                raise VarRedError("scale: expected a lower-triangular Cholesky factor")
            diag, off = scale.diagonal(), scale.tril(-1)
        elif scale.shape == (d,):
            diag, off = scale, None
        else:
            raise VarRedError(
                f"scale: expected a float, [{d}] or [{d}, {d}], got {shape_str(scale)}"
            )
        if bool((diag <= 0).any()):
            raise VarRedError(
                f"scale: expected positive scales (diagonal), got min {float(diag.min()):.3g}"
            )
        with torch.no_grad():
            raw_diag = diag.log() if transform == "log" else diag + torch.log(-torch.expm1(-diag))
            if kind == "meanfield":
                raw = raw_diag.clone()
            else:
                raw = torch.diag(raw_diag) + (off if off is not None else 0.0)
        self.loc = loc.detach().clone().requires_grad_(True)
        self.raw_scale = raw.detach().clone().requires_grad_(True)

    # ------------------------------------------------------------------ maps
    def parameters(self) -> list[torch.Tensor]:
        """``[loc, raw_scale]``."""
        return [self.loc, self.raw_scale]

    def _diag_raw(self) -> torch.Tensor:
        r = self.raw_scale.detach()
        return r if self.kind == "meanfield" else r.diagonal()

    def scale_diag(self) -> torch.Tensor:
        """``[d]`` positive diagonal ``S_ii`` (detached)."""
        r = self._diag_raw()
        return r.exp() if self.transform == "log" else torch.nn.functional.softplus(r)

    def _dscale(self) -> torch.Tensor:
        """``[d]`` ``dS_ii / dω_i``."""
        r = self._diag_raw()
        return r.exp() if self.transform == "log" else torch.sigmoid(r)

    def scale_matrix(self) -> torch.Tensor:
        """``[d, d]`` the scale ``S`` (diagonal or lower-triangular), detached."""
        if self.kind == "meanfield":
            return torch.diag(self.scale_diag())
        return self.raw_scale.detach().tril(-1) + torch.diag(self.scale_diag())

    def apply_scale(self, eps: torch.Tensor) -> torch.Tensor:
        """``S ε`` row-wise: ``[n, d] -> [n, d]``."""
        if self.kind == "meanfield":
            return eps * self.scale_diag()
        return eps @ self.scale_matrix().T

    def apply_inv_scale_t(self, eps: torch.Tensor) -> torch.Tensor:
        r"""``S^{-T} ε`` row-wise (``= -∇_z \log q(z)`` at ``z = μ + Sε``): ``[n, d] -> [n, d]``."""
        if self.kind == "meanfield":
            return eps / self.scale_diag()
        lt = self.scale_matrix().T  # upper triangular Sᵀ
        return torch.linalg.solve_triangular(lt, eps.T, upper=True).T

    def check_noise(self, eps: torch.Tensor, name: str = "eps") -> torch.Tensor:
        """Validate base noise ``[n, d]`` (floating, finite, this family's dtype and device)."""
        check_floating(name, eps)
        if eps.ndim != 2 or eps.shape[1] != self.d or eps.shape[0] == 0:
            raise VarRedError(f"{name}: expected shape [n, {self.d}], got {shape_str(eps)}")
        if eps.dtype != self.loc.dtype or eps.device != self.loc.device:
            raise VarRedError(
                f"{name}: expected dtype {self.loc.dtype} on {self.loc.device} (like the family), "
                f"got {eps.dtype} on {eps.device}"
            )
        return check_finite(name, eps)

    def sample_noise(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``ε [n, d]`` standard normal from ``generator`` (dtype/device of the family)."""
        return torch.randn(
            n, self.d, generator=generator, dtype=self.loc.dtype, device=self.loc.device
        )

    def transform_noise(self, eps: torch.Tensor) -> torch.Tensor:
        """``z = μ + S ε``: ``[n, d] -> [n, d]`` (detached)."""
        return self.loc.detach() + self.apply_scale(eps)

    # ------------------------------------------------------------------ chain rule
    def outer(self, g: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """What ``∂/∂S`` of ``gᵀ S ε`` keeps: ``g ⊙ ε [n, d]`` (mean-field) or ``g εᵀ [n, d, d]``."""
        if self.kind == "meanfield":
            return g * eps
        return g.unsqueeze(-1) * eps.unsqueeze(-2)

    def scale_chain(self, outer: torch.Tensor) -> torch.Tensor:
        """Chain rule ``∂/∂S → ∂/∂raw_scale``: ``[..., d]`` or ``[..., d, d]`` -> ``[..., *raw]``."""
        ds = self._dscale()
        if self.kind == "meanfield":
            return outer * ds
        low = outer.tril(-1)
        return low + torch.diag_embed(outer.diagonal(dim1=-2, dim2=-1) * ds)

    def entropy(self) -> torch.Tensor:
        """``[]`` closed-form entropy ``Σ log S_ii + d/2 (1 + log 2π)`` (detached)."""
        return self.scale_diag().log().sum() + 0.5 * self.d * (1.0 + math.log(2 * math.pi))

    def entropy_grad(self) -> torch.Tensor:
        """``[*raw]`` gradient of the entropy with respect to ``raw_scale`` (closed form)."""
        g = self._dscale() / self.scale_diag()  # d log S_ii / dω_i
        return g if self.kind == "meanfield" else torch.diag(g)
