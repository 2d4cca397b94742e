"""STUB: being written. Replace this whole file."""

__all__ = ['estimate', 'Estimate']


def estimate(*args, **kwargs):  # stub
    raise NotImplementedError('estimate is not written yet')


def Estimate(*args, **kwargs):  # stub
    raise NotImplementedError('Estimate is not written yet')

