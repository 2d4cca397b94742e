"""Options of :class:`varred.GradientControl`, validated once, and its parameter check."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

import torch

from varred.errors import VarRedError, check_floating, shape_str
from varred.moments import check_decay
from varred.vocabulary import Fit, canonical

__all__ = ["NONFINITE_POLICIES", "GradientControlConfig", "check_params"]

#: what a step with NaN/Inf writes: the gradient as is, zeros, or an error.
NONFINITE_POLICIES = ("propagate", "zero", "raise")

Tensor = torch.Tensor


@dataclass(frozen=True)
class GradientControlConfig:
    """Validated options of :class:`GradientControl` (see its docstring for their meaning)."""

    granularity: str = "element"
    coefficient: str | float = "running"
    decay: float = 0.99
    num_groups: int = 1
    warmup_steps: int = 10
    per_sample_fit: str = "running"
    folds: int = 2
    nonfinite: str = "propagate"
    raise_on_nonfinite: bool = False
    validate: bool = True
    group_backward: str = "auto"
    shrinkage: float = 0.0

    def __post_init__(self) -> None:
        if self.granularity not in ("element", "tensor", "scalar"):
            raise VarRedError(
                f"granularity: expected 'element', 'tensor' or 'scalar', got {self.granularity!r}"
            )
        c = self.coefficient
        if isinstance(c, str):
            if c not in ("running", "per_sample"):
                raise VarRedError(
                    f"coefficient: expected 'running', 'per_sample' or a float, got {c!r}"
                )
        elif isinstance(c, bool) or not isinstance(c, numbers.Real) or not math.isfinite(c):
            raise VarRedError(
                f"coefficient: expected 'running', 'per_sample' or a finite float, got {c!r}"
            )
        check_decay(self.decay)
        for name, low in (("num_groups", 1), ("warmup_steps", 0), ("folds", 2)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < low:
                raise VarRedError(f"{name}: expected an integer >= {low}, got {v!r}")
        canonical("per_sample_fit", self.per_sample_fit, (Fit.RUNNING, Fit.CROSSFIT))
        if self.nonfinite not in NONFINITE_POLICIES:
            raise VarRedError(
                f"nonfinite: expected 'propagate', 'zero' or 'raise', got {self.nonfinite!r}"
            )
        if self.raise_on_nonfinite and self.nonfinite != "raise":  # the deprecated spelling
            object.__setattr__(self, "nonfinite", "raise")
        object.__setattr__(self, "raise_on_nonfinite", self.nonfinite == "raise")
        if self.group_backward not in ("auto", "batched", "loop"):
            raise VarRedError(
                f"group_backward: expected 'auto', 'batched' or 'loop', got {self.group_backward!r}"
            )
        k = self.shrinkage
        if isinstance(k, bool) or not isinstance(k, numbers.Real) or not math.isfinite(k) or k < 0:
            raise VarRedError(f"shrinkage: expected a finite float >= 0, got {k!r}")


def check_params(params: Any) -> list[Tensor]:
    if isinstance(params, Tensor):
        params = [params]
    try:
        plist = list(params)
    except TypeError:
        raise VarRedError(
            f"params: expected an iterable of tensors, got {type(params).__name__}"
        ) from None
    out: list[Tensor] = []
    seen: set[int] = set()
    for i, p in enumerate(plist):
        check_floating(f"params[{i}]", p)
        if not p.requires_grad:
            raise VarRedError(
                f"params[{i}]: expected a tensor with requires_grad=True, got requires_grad=False "
                f"(shape {shape_str(p)})"
            )
        if p.device != plist[0].device:
            raise VarRedError(
                f"params[{i}]: expected all parameters on one device ({plist[0].device}), "
                f"got {p.device}"
            )
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    if not out:
        raise VarRedError("params: expected at least one parameter tensor, got none")
    return out
