"""The statistics :class:`varred.GradientControl` keeps between steps, and what it reports.

Flat centred moments over the ``P`` parameter entries (:mod:`varred.moments`): per group the
means and (co)variances of the control and loss gradients, and in running/fixed modes the
moments of the applied and the plain step gradient, for an honest running variance ratio.
"""

from __future__ import annotations

from typing import Any

import torch

from varred.errors import VarRedError, shape_str
from varred.moments import Moments, merge, observe, safe_div

__all__ = ["ControlStatistics"]

Tensor = torch.Tensor
_STATS = ("mean_c", "mean_l", "cov_cc", "cov_cl", "cov_ll")
_EW = "...,...->..."  # element-wise covariances; "...,...->" keeps a trace
_PAIRS = {"cov_cc": ("c", "c", _EW), "cov_cl": ("c", "l", _EW), "cov_ll": ("l", "l", _EW)}
_TRACE = "...,...->"
_TRACK_PAIRS = {"ctl_var": ("ctl", "ctl", _TRACE), "plain_var": ("plain", "plain", _TRACE)}


class ControlStatistics:
    """Running statistics of a gradient control (state only; the step is elsewhere).

    Args:
        num_groups: ``G``; numel: ``P``.
        per_sample: statistics of per-sample gradients (``mean_l``/``cov_ll`` per group, no
            tracked applied-gradient moments) instead of step gradients.
        decay: forgetting factor in ``(0, 1]``.
        dtype, device: of every statistic.
    """

    def __init__(
        self, num_groups: int, numel: int, per_sample: bool, decay: float,
        dtype: torch.dtype, device: torch.device,
    ) -> None:  # fmt: skip
        self.num_groups, self.numel, self.per_sample = num_groups, numel, per_sample
        self.decay, self.kw = float(decay), {"dtype": dtype, "device": device}
        self.reset()

    def reset(self) -> None:
        """Forget everything."""
        g, p, kw = self.num_groups, self.numel, self.kw
        gl = g if self.per_sample else 1
        self.stats = {
            k: torch.zeros(gl if k in ("mean_l", "cov_ll") else g, p, **kw) for k in _STATS
        }
        self.weight = torch.zeros(gl, **kw)
        self.num_updates = torch.zeros((), dtype=torch.int64, device=kw["device"])
        self.track = {} if self.per_sample else {
            "track_weight": torch.zeros(1, **kw), "ctl_mean": torch.zeros(p, **kw),
            "plain_mean": torch.zeros(p, **kw), "ctl_var": torch.zeros((), **kw),
            "plain_var": torch.zeros((), **kw),
        }  # fmt: skip

    def state_dict(self, header: dict[str, Any]) -> dict[str, Any]:
        """``header`` (ints) plus cloned ``weight``, ``num_updates``, statistics and track."""
        sd = dict(header)
        sd.update({"weight": self.weight.clone(), "num_updates": self.num_updates.clone()})
        sd.update({k: v.clone() for k, v in self.stats.items()})
        sd.update({k: v.clone() for k, v in self.track.items()})
        return sd

    def load_state_dict(self, state_dict: dict[str, Any], header: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output (same keys, header values and shapes)."""
        mine = self.state_dict(header)
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
        self.weight = state_dict["weight"].to(self.weight).clone()
        self.num_updates = state_dict["num_updates"].to(self.num_updates).clone()
        self.stats = {k: state_dict[k].to(v).clone() for k, v in self.stats.items()}
        self.track = {k: state_dict[k].to(v).clone() for k, v in self.track.items()}

    def update(self, g_l: Tensor, g_c: Tensor, finite: Tensor, batch: Any) -> None:
        """Fold a step in unless non-finite (masked, no sync): ``batch`` = per-sample batch
        moments ``(dict, n_g)`` (a Chan merge), or ``None`` for one observation ``(g_c, g_ℓ)``."""
        st = self.stats
        state = Moments(
            self.weight, {"c": st["mean_c"], "l": st["mean_l"]}, {k: st[k] for k in _PAIRS}
        )
        if batch is not None:
            b, count = batch
            bm = Moments(count, {"c": b["mean_c"], "l": b["mean_l"]}, {k: b[k] for k in _PAIRS})
            new = merge(state, bm, _PAIRS, self.decay, finite)
        else:
            new = observe(state, {"c": g_c, "l": g_l[None]}, _PAIRS, self.decay, finite)
        self.stats = {"mean_c": new.mean["c"], "mean_l": new.mean["l"], **new.cov}
        self.weight = new.weight
        self.num_updates = self.num_updates + finite.long()

    def update_track(self, ctl: Tensor, g_l: Tensor, ok: Tensor) -> None:
        """Moments of the applied ``ctl [P]`` and plain ``g_l [P]`` step gradients (traces)."""
        t = self.track
        state = Moments(t["track_weight"].reshape(()), {"ctl": t["ctl_mean"], "plain": t["plain_mean"]},
                        {"ctl_var": t["ctl_var"], "plain_var": t["plain_var"]})  # fmt: skip
        new = observe(state, {"ctl": ctl, "plain": g_l}, _TRACK_PAIRS, self.decay, ok)
        self.track = {"track_weight": new.weight.reshape(1), "ctl_mean": new.mean["ctl"],
                      "plain_mean": new.mean["plain"], **new.cov}  # fmt: skip

    def diagnostics(
        self, beta: Tensor, vb: Tensor, g_l: Tensor, g_c: Tensor, out: Tensor, finite: Tensor
    ) -> dict[str, Tensor]:
        """Detached step diagnostics (see ``GradientControl.backward``); ``vb`` = β per group
        ``[G, P | 1]`` expanded."""
        st, w, dtype = self.stats, self.weight, self.kw["dtype"]
        cl, cc = st["cov_cl"], st["cov_cc"]
        tll = st["cov_ll"].sum(1)  # [1] (running) or [G] (per-sample)
        # [G]: tr Var(g_ℓ − β_g g_c,g) = tr Var(g_ℓ) − Σ (2β Cov − β² Var) ≥ 0 (a PSD form)
        resid = (tll - (vb * (2 * cl - vb * cc)).sum(1)).clamp(min=0)
        per_group = torch.where(tll > 0, resid / torch.where(tll > 0, tll, 1), 1.0)
        if self.per_sample:  # pooled within-group per-sample ratio
            num, den = (resid * w).sum(), (tll * w).sum()
        else:  # tracked moments of the applied vs the plain step gradient
            num, den = self.track["ctl_var"], self.track["plain_var"]
        ratio = torch.where(den > 0, num / torch.where(den > 0, den, 1), 1.0)
        return {
            "variance_ratio": ratio.to(dtype),
            "variance_ratio_per_group": per_group.to(dtype),
            "correlation": safe_div(cl.sum(1), torch.sqrt(cc.sum(1) * tll)),
            "beta_mean": beta.mean(),
            "beta_min": beta.min(),
            "beta_max": beta.max(),
            "grad_norm_loss": torch.linalg.vector_norm(g_l),
            "grad_norm_control": torch.linalg.vector_norm(g_c.sum(0)),
            "grad_norm": torch.linalg.vector_norm(out),
            "finite": finite,
            "num_updates": self.num_updates.clone(),
        }
