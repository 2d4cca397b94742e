"""Variational inference: Gaussian families, ELBO gradients, Taylor/STL controls, a training helper."""

from __future__ import annotations

from varred.vi.control import ELBOControl as ELBOControl
from varred.vi.families import GaussianFamily as GaussianFamily
from varred.vi.gradient import elbo_grads as elbo_grads
from varred.vi.gradient import log_p_grad as log_p_grad
from varred.vi.gradient import score_control as score_control
from varred.vi.gradient import stl_grads as stl_grads
from varred.vi.gradient import taylor_controls as taylor_controls

__all__ = [
    "ELBOControl",
    "GaussianFamily",
    "elbo_grads",
    "log_p_grad",
    "score_control",
    "stl_grads",
    "taylor_controls",
]
