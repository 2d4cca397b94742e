"""The option vocabulary shared by ``varred`` and ``varred_diffusion`` (issue 15, item 4).

One name per concept, as ``str`` enums (members compare equal to their strings, so plain
strings keep working everywhere):

- :class:`BetaLayout`: which entries share a coefficient β. ``OptimalCoefficient(kind=)``,
  ``GradientControl(granularity=)`` / :class:`varred.layout.CoefficientLayout` and the
  diagnostics' ``kinds`` all take these names; the older spellings ``"diagonal"`` (=
  ``"element"``) and ``"bin"`` (= ``"full"`` over σ bins) are accepted as aliases.
- :class:`Fit`: where β comes from.
- :class:`MeanMethod` and :class:`ProbeDistribution`: how a Taylor control's mean is obtained.
  ``"hutchinson"`` is the one name for Rademacher trace probes (``tr J = E zᵀJz``, Hutchinson
  1989); ``"probe"`` evaluates the polynomial at an independent Gaussian draw.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import Enum

from varred.errors import VarRedError

__all__ = ["BetaLayout", "Fit", "MeanMethod", "ProbeDistribution", "canonical"]


class BetaLayout(str, Enum):
    """Which entries share one coefficient β."""

    UNIT = "unit"  # β = 1: the objective-level control (Jeha et al. 2024)
    SCALAR = "scalar"  # one β (per control), pooled over every entry
    TENSOR = "tensor"  # one β per parameter tensor
    ELEMENT = "element"  # one β per entry / output, univariate ("diagonal")
    FULL = "full"  # per entry, a joint regression over stacked controls or σ bins ("bin")

    def __str__(self) -> str:
        return self.value


class Fit(str, Enum):
    """Where β comes from (never from the samples it is applied to, except ``batch``)."""

    CROSSFIT = "crossfit"  # K folds, each with β from the others
    BATCH = "batch"  # plug-in on the same samples (O(1/n) bias)
    RUNNING = "running"  # statistics of earlier calls / steps
    FIXED = "fixed"  # a given number

    def __str__(self) -> str:
        return self.value


class MeanMethod(str, Enum):
    """How the mean of a Taylor control is computed."""

    AUTO = "auto"
    EXACT = "exact"  # Isserlis / cubature / Laplacians (small d)
    PROBE = "probe"  # the polynomial at an independent Gaussian draw (any d, any order)
    HUTCHINSON = "hutchinson"  # Rademacher trace probes for the traces the mean needs

    def __str__(self) -> str:
        return self.value


class ProbeDistribution(str, Enum):
    """The distribution of probe vectors."""

    GAUSSIAN = "gaussian"
    RADEMACHER = "rademacher"

    def __str__(self) -> str:
        return self.value


_ALIASES = {"diagonal": BetaLayout.ELEMENT, "bin": BetaLayout.FULL}


def canonical(name: str, value: object, allowed: Iterable[Enum]) -> str:
    """The canonical string of ``value`` among ``allowed`` members (aliases resolved).

    Raises:
        VarRedError: ``value`` is none of them, naming ``name`` and the allowed strings.
    """
    members = list(allowed)
    v = value.value if isinstance(value, Enum) else value
    v = _ALIASES.get(v, v) if isinstance(v, str) else v  # type: ignore[call-overload]
    v = v.value if isinstance(v, Enum) else v
    for m in members:
        if v == m.value:
            return m.value
    names = ", ".join(repr(m.value) for m in members)
    raise VarRedError(f"{name}: expected one of {names}, got {value!r}")
