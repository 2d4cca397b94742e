"""varred: control variates for Monte Carlo estimates and stochastic gradients.

Variational inference (reparameterisation gradients with Taylor controls, STL) lives in
:mod:`varred.vi`.
"""

from __future__ import annotations

from varred.antithetic import antithetic_estimate as antithetic_estimate
from varred.coefficients import OptimalCoefficient as OptimalCoefficient
from varred.coefficients import RunningMoments as RunningMoments
from varred.control import ControlVariate as ControlVariate
from varred.control import stack_controls as stack_controls
from varred.errors import VarRedError as VarRedError
from varred.estimate import Estimate as Estimate
from varred.estimate import estimate as estimate
from varred.gaussian import double_factorial as double_factorial
from varred.gaussian import gauss_hermite_cubature as gauss_hermite_cubature
from varred.gaussian import gaussian_polynomial_expectation as gaussian_polynomial_expectation
from varred.gaussian import isserlis_pairings as isserlis_pairings
from varred.gradient import GradientControl as GradientControl
from varred.gradient import GradientControlConfig as GradientControlConfig
from varred.layout import CoefficientLayout as CoefficientLayout
from varred.moments import Moments as Moments
from varred.score_function import loo_baseline as loo_baseline
from varred.score_function import score_function_surrogate as score_function_surrogate
from varred.taylor import TaylorCV as TaylorCV
from varred.taylor import iterated_laplacian as iterated_laplacian
from varred.taylor import taylor_terms as taylor_terms
from varred.vocabulary import BetaLayout as BetaLayout
from varred.vocabulary import Fit as Fit
from varred.vocabulary import MeanMethod as MeanMethod

__version__ = "0.2.0.dev0"
__all__ = [
    "BetaLayout",
    "CoefficientLayout",
    "ControlVariate",
    "Estimate",
    "Fit",
    "GradientControl",
    "GradientControlConfig",
    "MeanMethod",
    "Moments",
    "OptimalCoefficient",
    "RunningMoments",
    "TaylorCV",
    "VarRedError",
    "antithetic_estimate",
    "double_factorial",
    "estimate",
    "gauss_hermite_cubature",
    "gaussian_polynomial_expectation",
    "isserlis_pairings",
    "iterated_laplacian",
    "loo_baseline",
    "score_function_surrogate",
    "stack_controls",
    "taylor_terms",
]
