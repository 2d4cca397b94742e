"""Stable Target Field: the posterior mean of the clean point over a reference set.

Xu, Tong & Jaakkola (ICLR 2023), "Stable Target Field for Reduced Variance Score Estimation
in Diffusion Models". DSM regresses ``σ s_θ(x_t)`` onto ``−ε``, whose conditional mean
given ``x_t`` is the quantity a score network can learn; STF replaces ``ε`` by a
lower-variance estimate of that conditional mean. With ``x_t = α x + σ ε`` and a reference
set ``{r_j}``, the self-normalised posterior

.. math:: w_{ij} = \\frac{\\exp(−‖x_{t,i} − α_i r_j‖² / 2σ_i²)}{\\sum_k \\exp(−‖x_{t,i} − α_i r_k‖² / 2σ_i²)},
          \\qquad \\hat x_0(x_{t,i}) = \\sum_j w_{ij} r_j,

and the target ``ε̃ = (x_t − α x̂₀)/σ = ε + α (x − x̂₀)/σ`` (the second form is the one
computed: it is ``ε`` bit for bit when ``x̂₀ = x``, as happens when σ → 0).

Cost: ``O(B·R·D)`` flops (two matmuls per chunk) and ``O(B·R_c + B·D + R_c·D)`` memory for
chunks of ``R_c`` references, merged with an online log-sum-exp; never a ``B×R×D`` tensor.

The reference sources (a fresh batch per step, a memory bank of recent data) live in
:mod:`varred_diffusion.stf_reference`.
"""

from __future__ import annotations

import numbers
from typing import Any, Protocol

import torch
from torch import Tensor

from varred.errors import VarRedError, check_finite, check_floating, shape_str
from varred_diffusion.losses import as_sigma, perturb
from varred_diffusion.schedules import append_dims, per_sample

__all__ = ["ReferenceSource", "StableTarget", "stf_target", "stf_weights"]


class ReferenceSource(Protocol):
    """Where :class:`StableTarget` gets its references from.

    ``reference(x, labels)`` returns ``(reference [R, ...], reference_labels [R] or None)``
    for the batch ``x [B, ...]`` (``R = 0`` allowed); ``update(x, labels)`` is called after
    the target is computed (a no-op for fresh draws).
    """

    def reference(self, x: Tensor, labels: Tensor | None) -> tuple[Tensor, Tensor | None]: ...

    def update(self, x: Tensor, labels: Tensor | None) -> None: ...


def _check_chunk(chunk: Any) -> int:
    if isinstance(chunk, bool) or not isinstance(chunk, numbers.Integral) or chunk < 1:
        raise VarRedError(f"chunk: expected a positive integer, got {chunk!r}")
    return int(chunk)


def _prepare(
    xt: Tensor,
    sigma: float | Tensor,
    reference: Tensor,
    alpha: float | Tensor | None,
    own: Tensor | None,
    labels: Tensor | None,
    reference_labels: Tensor | None,
    validate: bool,
) -> tuple[Tensor, Tensor]:
    """Check the arguments; return per-sample ``(σ [B], α [B])`` in ``xt``'s dtype."""
    check_floating("xt", xt)
    if xt.ndim < 2:
        raise VarRedError(f"xt: expected a batch [B, ...] with ≥ 1 data dim, got {shape_str(xt)}")
    check_floating("reference", reference)
    if reference.ndim != xt.ndim or reference.shape[1:] != xt.shape[1:]:
        raise VarRedError(
            f"reference: expected shape [R, {', '.join(map(str, xt.shape[1:]))}] "
            f"(the data shape of xt), got {shape_str(reference)}"
        )
    if reference.shape[0] == 0 and own is None:
        raise VarRedError(
            f"reference: expected at least one reference point (R ≥ 1), got {shape_str(reference)}"
        )
    if own is not None:
        check_floating("own", own)
        if own.shape != xt.shape:
            raise VarRedError(
                f"own: expected the shape of xt {shape_str(xt)}, got {shape_str(own)}"
            )
    if (labels is None) != (reference_labels is None):
        raise VarRedError(
            "labels: expected labels and reference_labels both given or both None, got "
            f"labels {shape_str(labels)} and reference_labels {shape_str(reference_labels)}"
        )
    if labels is not None and reference_labels is not None:
        if labels.shape != (xt.shape[0],):
            raise VarRedError(f"labels: expected shape [{xt.shape[0]}], got {shape_str(labels)}")
        if reference_labels.shape != (reference.shape[0],):
            raise VarRedError(
                f"reference_labels: expected shape [{reference.shape[0]}] (one per reference), "
                f"got {shape_str(reference_labels)}"
            )
    s = as_sigma(sigma, xt, validate=validate)
    a = per_sample("alpha", alpha, xt.shape[0], xt, default=1.0)
    if validate:
        check_finite("xt", xt)
        check_finite("reference", reference)
        check_finite("alpha", a)
        if bool((a < 0).any()):
            raise VarRedError(f"alpha: expected ≥ 0, got min {float(a.min())}")
    return s, a


def _logits(x: Tensor, xn: Tensor, r: Tensor, a: Tensor, two_s2: Tensor) -> Tensor:
    """``−‖x_i − α_i r_j‖² / 2σ_i²`` ``[B, n]`` from ``x [B, D]``, ``r [n, D]`` by one matmul."""
    g = x @ r.T  # [B, n]
    rn = r.pow(2).sum(1)  # [n]
    d = xn[:, None] - 2 * a[:, None] * g + (a * a)[:, None] * rn[None, :]
    return -d.clamp_min(0) / two_s2[:, None]


def stf_target(
    xt: Tensor,
    sigma: float | Tensor,
    reference: Tensor,
    *,
    alpha: float | Tensor | None = None,
    own: Tensor | None = None,
    labels: Tensor | None = None,
    reference_labels: Tensor | None = None,
    chunk: int = 2048,
    validate: bool = True,
) -> Tensor:
    """Self-normalised posterior mean ``x̂₀ = Σ_j w_ij r_j`` of the clean point ``[B, ...]``.

    ``w_ij ∝ exp(−‖x_{t,i} − α_i r_j‖² / 2σ_i²)`` over the references (and, per row, the
    optional ``own`` point), in log space with the row maximum subtracted, in chunks of
    ``chunk`` references merged by an online log-sum-exp (Xu, Tong & Jaakkola, 2023, eq. 4).
    Distances use ``‖x‖² − 2α x·r + α²‖r‖²`` (matmuls), so memory is ``O(B·chunk + B·D +
    chunk·D)``, never ``B×R×D``.

    **Bias.** The ratio is a self-normalised importance-sampling estimate of the exact
    posterior mean ``E[x₀ | x_t]`` under the data distribution, so it is biased for finite R
    whenever the references are not what that identity needs: with references drawn
    independently of ``x_t`` (no ``own`` point, or ``x_t`` not generated from one of the
    references) the bias is ``O(1/R)`` (the classical ratio-estimator bias, Hesterberg 1988)
    and pulls ``x̂₀`` toward the nearest references. STF's construction puts the sample's own
    clean point in the reference set (the minibatch is part of the reference batch): if the
    other ``R`` references are i.i.d. from the same distribution as the sample, then
    ``E[x̂₀ | x_t] = E[x₀ | x_t]`` exactly for every R (conditional importance sampling:
    one point from the posterior, R from the prior; the paper states only that the bias
    vanishes as R → ∞). That exactness fails, leaving a bias (not measured here)
    when the references are correlated with the sample: drawn without replacement from
    a finite set of N (a memory bank of the current epoch never holds the sample itself),
    stale duplicates, or another class. ``docs/techniques.md`` (STF) measures both cases on
    Fashion-MNIST against the exact posterior mean over the 60,000 training images.

    Args:
        xt: noisy points ``[B, ...]``.
        sigma: ``[B]`` noise levels (or a float), > 0.
        reference: ``[R, ...]`` reference points with ``xt``'s data shape (any float dtype).
        alpha: signal scale ``[B]`` or a float (``None``: VE, α = 1), ≥ 0.
        own: optional ``[B, ...]``: row ``i`` adds ``own[i]`` to row ``i``'s reference set
            only (the sample's own clean point); then ``R = 0`` is allowed.
        labels: optional ``[B]`` class labels; with ``reference_labels`` ``[R]`` the weights
            of references of another class are zero (``own`` counts as the row's class).
        reference_labels: ``[R]`` labels of the references.
        chunk: references per matmul block (memory ``B·chunk``).
        validate: check finiteness and positivity (host syncs).

    Returns:
        ``x̂₀`` ``[B, ...]`` in ``xt``'s dtype (computed in at least float32).

    Raises:
        VarRedError: ``R = 0`` without ``own``; ``reference`` not ``[R, *xt.shape[1:]]``;
            ``σ ≤ 0``, ``α < 0`` or non-finite; bad label shapes; a row with no reference
            of its class (with ``validate``); ``chunk < 1``.

    Example:
        >>> ref = torch.tensor([[0.0], [2.0]])
        >>> stf_target(torch.tensor([[1.0]]), torch.tensor([1.0]), ref)  # equidistant: mean
        tensor([[1.]])
    """
    chunk = _check_chunk(chunk)
    s, a = _prepare(xt, sigma, reference, alpha, own, labels, reference_labels, validate)
    b = xt.shape[0]
    dtype = torch.promote_types(xt.dtype, torch.float32)
    with torch.autocast(device_type=xt.device.type, enabled=False):
        x = xt.reshape(b, -1).to(dtype)  # [B, ...] -> [B, D]
        s, a = s.to(dtype), a.to(dtype)
        two_s2 = 2 * s * s  # [B]
        xn = x.pow(2).sum(1)  # [B]
        if own is not None:
            o = own.reshape(b, -1).to(dtype)  # [B, D]
            m = -(x - a[:, None] * o).pow(2).sum(1) / two_s2  # [B] running max of the logits
            total = torch.ones_like(m)  # Σ exp(logit − m)
            acc = o  # Σ exp(logit − m) r   [B, D]
        else:
            m = torch.full((b,), float("-inf"), dtype=dtype, device=x.device)
            total = torch.zeros_like(m)
            acc = torch.zeros_like(x)
        for start in range(0, reference.shape[0], chunk):
            r = reference[start : start + chunk]
            r = r.reshape(r.shape[0], -1).to(device=x.device, dtype=dtype)  # [n, D]
            logit = _logits(x, xn, r, a, two_s2)  # [B, n]
            if labels is not None and reference_labels is not None:
                rl = reference_labels[start : start + chunk].to(labels.device)
                logit = logit.masked_fill(labels[:, None] != rl[None, :], float("-inf"))
            new_m = torch.maximum(m, logit.amax(1))
            shift = torch.where(torch.isfinite(new_m), new_m, torch.zeros_like(new_m))
            scale = torch.exp(m - shift)  # [B]; 0 where nothing was seen yet
            p = torch.exp(logit - shift[:, None])  # [B, n], max entry exactly 1
            total = total * scale + p.sum(1)
            acc = acc * scale[:, None] + p @ r
            m = new_m
        if validate and bool((total == 0).any()):
            row = int((total == 0).nonzero()[0])
            raise VarRedError(
                f"reference_labels: row {row} (label {int(labels[row]) if labels is not None else '?'}) "
                "has no reference of its class and no own point"
            )
        x0 = acc / total[:, None]
    return x0.reshape(xt.shape).to(xt.dtype)


def stf_weights(
    xt: Tensor,
    sigma: float | Tensor,
    reference: Tensor,
    *,
    alpha: float | Tensor | None = None,
    validate: bool = True,
) -> Tensor:
    """The normalised STF weights ``w`` ``[B, R]`` (one block; for diagnostics and small R).

    Same arguments and conventions as :func:`stf_target` (no ``own``, no labels);
    ``stf_target(xt, σ, ref) == stf_weights(xt, σ, ref) @ ref`` up to round-off.

    Returns:
        ``[B, R]`` weights in at least float32, each row summing to 1.
    """
    s, a = _prepare(xt, sigma, reference, alpha, None, None, None, validate)
    dtype = torch.promote_types(xt.dtype, torch.float32)
    with torch.autocast(device_type=xt.device.type, enabled=False):
        x = xt.reshape(xt.shape[0], -1).to(dtype)  # [B, D]
        r = reference.reshape(reference.shape[0], -1).to(device=x.device, dtype=dtype)  # [R, D]
        s, a = s.to(dtype), a.to(dtype)
        return torch.softmax(_logits(x, x.pow(2).sum(1), r, a, 2 * s * s), dim=1)


class StableTarget:
    """Recipe target part: DSM's ``ε`` replaced by the STF target ``ε̃ = ε + α (x − x̂₀)/σ``.

    ``x̂₀ = stf_target(x_t, σ, batch ∪ references)``: the minibatch ``x`` itself is in the
    reference set (each sample's own clean point among them, as in Xu, Tong & Jaakkola,
    2023), plus the references of ``source`` (a :class:`~varred_diffusion.stf_reference.FreshReference`
    or :class:`~varred_diffusion.stf_reference.MemoryBank`; ``None``: the batch only).
    After the target is computed, ``source.update(x, labels)`` is called (so a memory bank
    never holds the current batch twice). The target is computed without gradient.

    With the batch only (``R = B``) and σ → 0, ``ε̃ = ε`` bit for bit (the weights become
    one-hot on the sample's own point). ``include_batch=False`` drops the batch from the
    reference set: the own point is then missing and the target is biased (``O(1/R)``;
    see :func:`stf_target`).

    Args:
        source: reference source or ``None``.
        include_batch: put the minibatch in the reference set (the paper's STF).
        chunk: references per block in :func:`stf_target`.
        validate: argument checks in :func:`stf_target` (host syncs).

    Call:
        ``target(x [B, ...], sigma [B], noise [B, ...], alpha [B] | None, xt [B, ...] | None,
        *, labels [B] | None) -> eps_target [B, ...]`` (in ``noise``'s dtype); ``xt=None``
        recomputes ``α x + σ ε``. With ``labels`` only same-class references count (the
        source must return reference labels).

    Example:
        >>> target = StableTarget()
        >>> x, eps = torch.randn(8, 3), torch.randn(8, 3)
        >>> bool((target(x, torch.full((8,), 1e-4), eps) == eps).all())
        True
    """

    def __init__(
        self,
        source: ReferenceSource | None = None,
        *,
        include_batch: bool = True,
        chunk: int = 2048,
        validate: bool = True,
    ) -> None:
        if source is None and not include_batch:
            raise VarRedError(
                "include_batch: expected True when source is None (no references), got False"
            )
        self.source = source
        self.include_batch = bool(include_batch)
        self.chunk = _check_chunk(chunk)
        self.validate = bool(validate)

    def __call__(
        self,
        x: Tensor,
        sigma: float | Tensor,
        noise: Tensor,
        alpha: float | Tensor | None = None,
        xt: Tensor | None = None,
        *,
        labels: Tensor | None = None,
    ) -> Tensor:
        check_floating("x", x)
        check_floating("noise", noise)
        if noise.shape != x.shape:
            raise VarRedError(
                f"noise: expected the shape of x {shape_str(x)}, got {shape_str(noise)}"
            )
        with torch.no_grad():
            x = x.detach()
            if xt is None:
                xt = perturb(x, sigma, noise, alpha)
            elif xt.shape != x.shape:
                raise VarRedError(
                    f"xt: expected the shape of x {shape_str(x)}, got {shape_str(xt)}"
                )
            refs, ref_labels = self._references(x, labels)
            x0 = stf_target(
                xt.detach(),
                sigma,
                refs,
                alpha=alpha,
                labels=labels,
                reference_labels=ref_labels,
                chunk=self.chunk,
                validate=self.validate,
            )
            s = append_dims(as_sigma(sigma, x, validate=False), x.ndim)
            a = append_dims(per_sample("alpha", alpha, x.shape[0], x, default=1.0), x.ndim)
            eps = noise.detach() + a * (x - x0) / s
            if self.source is not None:
                self.source.update(x, labels)
        return eps.to(noise.dtype)

    def _references(self, x: Tensor, labels: Tensor | None) -> tuple[Tensor, Tensor | None]:
        if self.source is None:
            return x, labels
        refs, ref_labels = self.source.reference(x, labels)
        refs = refs.to(device=x.device)
        if labels is not None and ref_labels is None:
            raise VarRedError(
                "labels: the reference source returns no labels, so references cannot be "
                "matched by class; use MemoryBank(size, num_classes=...) or a draw that "
                "returns (images, labels)"
            )
        if not self.include_batch:
            return refs, ref_labels
        if refs.shape[1:] != x.shape[1:]:
            raise VarRedError(
                f"source: expected references of shape [R, {', '.join(map(str, x.shape[1:]))}], "
                f"got {shape_str(refs)}"
            )
        both = torch.cat([x, refs.to(x.dtype)], dim=0)  # [B + R, ...]
        if labels is None or ref_labels is None:
            return both, None
        return both, torch.cat([labels, ref_labels.to(labels.device, labels.dtype)], dim=0)
