"""varred_diffusion: variance reduction for diffusion and flow-matching training.

The toy data (``varred_diffusion.toy``) and the small score networks (``varred_diffusion.models``)
stay importable from here for the examples but are not part of ``__all__``: they are the
experiments' fixtures, not the library's API.
"""

from __future__ import annotations

from varred_diffusion.adapters import DiffusersAdapter as DiffusersAdapter
from varred_diffusion.adapters import DiffusersEpsAdapter as DiffusersEpsAdapter
from varred_diffusion.adapters import EpsFromScore as EpsFromScore
from varred_diffusion.adapters import ScoreFromEps as ScoreFromEps
from varred_diffusion.adapters import ScoreFromV as ScoreFromV
from varred_diffusion.adapters import ScoreFromX0 as ScoreFromX0
from varred_diffusion.adaptive_sampler import AdaptiveSigmaSampler as AdaptiveSigmaSampler
from varred_diffusion.auto import AutoStep as AutoStep
from varred_diffusion.batch import Batch as Batch
from varred_diffusion.bins import LogSNRBins as LogSNRBins
from varred_diffusion.bins import QuantileBins as QuantileBins
from varred_diffusion.bins import SigmaBins as SigmaBins
from varred_diffusion.controls import AntitheticPairs as AntitheticPairs
from varred_diffusion.controls import FlowTaylorControl as FlowTaylorControl
from varred_diffusion.controls import TaylorControl as TaylorControl
from varred_diffusion.coupling import ot_pair_noise as ot_pair_noise
from varred_diffusion.diagnostics import VarianceRatio as VarianceRatio
from varred_diffusion.diagnostics import gradient_variance_ratio as gradient_variance_ratio
from varred_diffusion.diagnostics import per_sample_gradients as per_sample_gradients
from varred_diffusion.diagnostics import variance_ratio_by_sigma as variance_ratio_by_sigma
from varred_diffusion.flow import RectifiedFlowSchedule as RectifiedFlowSchedule
from varred_diffusion.flow import ScoreFromVelocity as ScoreFromVelocity
from varred_diffusion.flow import flow_matching_loss as flow_matching_loss
from varred_diffusion.flow import flow_matching_taylor_cv as flow_matching_taylor_cv
from varred_diffusion.flow import flow_matching_weighting as flow_matching_weighting
from varred_diffusion.losses import dsm_loss as dsm_loss
from varred_diffusion.losses import loss_weights as loss_weights
from varred_diffusion.losses import perturb as perturb
from varred_diffusion.models import MLPScore as MLPScore
from varred_diffusion.models import SmallUNet as SmallUNet
from varred_diffusion.models import init_parameters as init_parameters
from varred_diffusion.models import parameter_count as parameter_count
from varred_diffusion.noise_levels import EDMLogNormal as EDMLogNormal
from varred_diffusion.noise_levels import LaplaceLogSNR as LaplaceLogSNR
from varred_diffusion.noise_levels import LogitNormal as LogitNormal
from varred_diffusion.objective_densities import LogUniform as LogUniform
from varred_diffusion.objective_densities import Uniform as Uniform
from varred_diffusion.recipe import NoiseLevelSampler as NoiseLevelSampler
from varred_diffusion.recipe import Recipe as Recipe
from varred_diffusion.recipe import Target as Target
from varred_diffusion.sampling import ImportanceSigmaSampler as ImportanceSigmaSampler
from varred_diffusion.sampling import LogUniformSigma as LogUniformSigma
from varred_diffusion.sampling import StratifiedSigma as StratifiedSigma
from varred_diffusion.sampling import antithetic_noise as antithetic_noise
from varred_diffusion.sampling import log_uniform_sigma as log_uniform_sigma
from varred_diffusion.sampling import low_discrepancy_uniform as low_discrepancy_uniform
from varred_diffusion.sampling import stratified_uniform as stratified_uniform
from varred_diffusion.schedules import VESchedule as VESchedule
from varred_diffusion.schedules import VPSchedule as VPSchedule
from varred_diffusion.schedules import append_dims as append_dims
from varred_diffusion.stf import StableTarget as StableTarget
from varred_diffusion.stf import stf_target as stf_target
from varred_diffusion.stf import stf_weights as stf_weights
from varred_diffusion.stf_reference import FreshReference as FreshReference
from varred_diffusion.stf_reference import MemoryBank as MemoryBank
from varred_diffusion.taylor_cv import dsm_taylor_cv as dsm_taylor_cv
from varred_diffusion.toy import GaussianMixture as GaussianMixture
from varred_diffusion.toy import ScoreError as ScoreError
from varred_diffusion.toy import asymmetric as asymmetric
from varred_diffusion.toy import ring8 as ring8
from varred_diffusion.toy import score_error as score_error
from varred_diffusion.training import ControlledDSM as ControlledDSM
from varred_diffusion.training_step import TrainingStep as TrainingStep
from varred_diffusion.weightings import EDMWeighting as EDMWeighting
from varred_diffusion.weightings import LearnedUncertainty as LearnedUncertainty
from varred_diffusion.weightings import MinSNRWeighting as MinSNRWeighting

__version__ = "0.2.0.dev0"
__all__ = [
    "AdaptiveSigmaSampler",
    "AntitheticPairs",
    "AutoStep",
    "Batch",
    "ControlledDSM",
    "DiffusersAdapter",
    "DiffusersEpsAdapter",
    "EDMLogNormal",
    "EDMWeighting",
    "EpsFromScore",
    "FlowTaylorControl",
    "FreshReference",
    "ImportanceSigmaSampler",
    "LaplaceLogSNR",
    "LearnedUncertainty",
    "LogSNRBins",
    "LogUniform",
    "LogUniformSigma",
    "LogitNormal",
    "MemoryBank",
    "MinSNRWeighting",
    "NoiseLevelSampler",
    "QuantileBins",
    "Recipe",
    "RectifiedFlowSchedule",
    "ScoreFromEps",
    "ScoreFromV",
    "ScoreFromVelocity",
    "ScoreFromX0",
    "SigmaBins",
    "StableTarget",
    "StratifiedSigma",
    "Target",
    "TaylorControl",
    "TrainingStep",
    "Uniform",
    "VESchedule",
    "VPSchedule",
    "VarianceRatio",
    "antithetic_noise",
    "append_dims",
    "dsm_loss",
    "dsm_taylor_cv",
    "flow_matching_loss",
    "flow_matching_taylor_cv",
    "flow_matching_weighting",
    "gradient_variance_ratio",
    "log_uniform_sigma",
    "loss_weights",
    "low_discrepancy_uniform",
    "ot_pair_noise",
    "per_sample_gradients",
    "perturb",
    "stf_target",
    "stf_weights",
    "stratified_uniform",
    "variance_ratio_by_sigma",
]
