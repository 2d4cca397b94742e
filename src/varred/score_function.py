"""STUB: being written. Replace this whole file."""

__all__ = ['loo_baseline', 'score_function_surrogate']


def loo_baseline(*args, **kwargs):  # stub
    raise NotImplementedError('loo_baseline is not written yet')


def score_function_surrogate(*args, **kwargs):  # stub
    raise NotImplementedError('score_function_surrogate is not written yet')

