"""Control variates: a value function with a known mean, and stacking several of them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from varred.errors import VarRedError, check_broadcastable, check_floating, shape_str

__all__ = ["ControlVariate", "stack_controls"]


@dataclass(frozen=True)
class ControlVariate:
    r"""A control variate :math:`c(\omega) = g(\omega) - \mathbb{E}[g]` with a known mean.

    Calling it on samples returns ``fn(samples) - mean``, which has expectation zero
    when ``mean`` is the true mean of ``fn`` under the sampling distribution.
    Reference: Owen (2013), *Monte Carlo theory, methods and examples*, §8.9.

    Args:
        fn: batched value function ``[n, ...] -> [n, *out]``.
        mean: the known expectation ``E[fn]``; a float or a tensor broadcastable
            to ``[*out]`` (the trailing shape of ``fn``'s output).

    Example:
        >>> cv = ControlVariate(lambda x: x.sum(-1), mean=0.0)
        >>> cv(torch.ones(4, 3)).shape
        torch.Size([4])
    """

    fn: Callable[[torch.Tensor], torch.Tensor]
    mean: torch.Tensor | float = 0.0

    def __post_init__(self) -> None:
        if not callable(self.fn):
            raise VarRedError(f"fn: expected a callable, got {type(self.fn).__name__}")
        mean = self.mean
        if isinstance(mean, bool) or not isinstance(mean, (int, float, torch.Tensor)):
            raise VarRedError(
                f"mean: expected a float or a floating tensor, got {type(mean).__name__}"
            )
        if isinstance(mean, torch.Tensor):
            check_floating("mean", mean)
            if not bool(torch.isfinite(mean).all()):
                raise VarRedError(f"mean: expected finite values, got {mean!r}")
        elif not torch.isfinite(torch.tensor(float(mean))):
            raise VarRedError(f"mean: expected a finite number, got {mean!r}")

    def __call__(self, samples: torch.Tensor) -> torch.Tensor:
        """Zero-mean control values.

        Args:
            samples: ``[n, ...]`` samples from the distribution the mean refers to.

        Returns:
            ``[n, *out]``: ``fn(samples) - mean``.

        Raises:
            VarRedError: if ``fn`` does not return a floating tensor with a leading
                sample dimension, or ``mean`` does not broadcast to ``[*out]``.
        """
        values = self.fn(samples)
        check_floating("fn(samples)", values)
        if values.ndim < 1:
            raise VarRedError(
                f"fn(samples): expected per-sample values of shape [n, *out], got shape {shape_str(values)}"
            )
        mean = self.mean
        if isinstance(mean, torch.Tensor):
            check_broadcastable(
                "mean", mean, tuple(values.shape[1:]), "the per-sample output shape"
            )
            mean = mean.to(device=values.device, dtype=values.dtype)
        return values - mean


@dataclass(frozen=True)
class _Stacked:
    """The value function of stacked controls: ``[n, ...] -> [n, *out, m]``."""

    controls: tuple[Callable[[torch.Tensor], torch.Tensor], ...]

    def __call__(self, samples: torch.Tensor) -> torch.Tensor:
        values = [c(samples) for c in self.controls]
        first = values[0]
        for j, v in enumerate(values):
            if v.shape != first.shape:
                raise VarRedError(
                    f"controls[{j}]: expected output shape {shape_str(first)} "
                    f"(that of controls[0]), got {shape_str(v)}"
                )
        return torch.stack(values, dim=-1)  # m x [n, *out] -> [n, *out, m]


def stack_controls(
    controls: Sequence[ControlVariate | Callable[[torch.Tensor], torch.Tensor]],
) -> ControlVariate:
    """Stack ``m`` zero-mean controls into one control with output ``[n, *out, m]``.

    Each entry is called on the same samples and must already be zero-mean (a
    :class:`ControlVariate`, a ``TaylorCV``, or any callable returning centred values);
    the result has ``mean = 0``.

    Args:
        controls: a non-empty sequence of controls, each ``[n, ...] -> [n, *out]``
            with the same ``[n, *out]``.

    Returns:
        A :class:`ControlVariate` whose values are ``[n, *out, m]``.

    Raises:
        VarRedError: if ``controls`` is empty or holds a non-callable.

    Example:
        >>> c1 = ControlVariate(lambda x: x[:, 0], 0.0)
        >>> c2 = ControlVariate(lambda x: x[:, 0] ** 2, 1.0)
        >>> stack_controls([c1, c2])(torch.randn(5, 2, dtype=torch.float64)).shape
        torch.Size([5, 2])
    """
    if isinstance(controls, (ControlVariate, torch.Tensor)) or not isinstance(controls, Sequence):
        raise VarRedError(
            f"controls: expected a sequence of controls, got {type(controls).__name__}"
        )
    if len(controls) == 0:
        raise VarRedError("controls: expected at least one control, got an empty sequence")
    for j, c in enumerate(controls):
        if not callable(c):
            raise VarRedError(f"controls[{j}]: expected a callable control, got {type(c).__name__}")
    return ControlVariate(_Stacked(tuple(controls)), 0.0)
