"""STUB: being written. Replace this whole file."""

__all__ = ['stratified_uniform', 'low_discrepancy_uniform', 'log_uniform_sigma', 'antithetic_noise', 'ImportanceSigmaSampler']


def stratified_uniform(*args, **kwargs):  # stub
    raise NotImplementedError('stratified_uniform is not written yet')


def low_discrepancy_uniform(*args, **kwargs):  # stub
    raise NotImplementedError('low_discrepancy_uniform is not written yet')


def log_uniform_sigma(*args, **kwargs):  # stub
    raise NotImplementedError('log_uniform_sigma is not written yet')


def antithetic_noise(*args, **kwargs):  # stub
    raise NotImplementedError('antithetic_noise is not written yet')


def ImportanceSigmaSampler(*args, **kwargs):  # stub
    raise NotImplementedError('ImportanceSigmaSampler is not written yet')

