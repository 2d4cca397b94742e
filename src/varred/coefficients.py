"""STUB: being written. Replace this whole file."""

__all__ = ['OptimalCoefficient', 'RunningMoments']


def OptimalCoefficient(*args, **kwargs):  # stub
    raise NotImplementedError('OptimalCoefficient is not written yet')


def RunningMoments(*args, **kwargs):  # stub
    raise NotImplementedError('RunningMoments is not written yet')

