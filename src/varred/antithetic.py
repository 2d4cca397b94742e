"""STUB: being written. Replace this whole file."""

__all__ = ['antithetic_estimate']


def antithetic_estimate(*args, **kwargs):  # stub
    raise NotImplementedError('antithetic_estimate is not written yet')

