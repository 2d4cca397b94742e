"""STUB: being written. Replace this whole file."""

__all__ = ['VESchedule', 'VPSchedule', 'append_dims']


def VESchedule(*args, **kwargs):  # stub
    raise NotImplementedError('VESchedule is not written yet')


def VPSchedule(*args, **kwargs):  # stub
    raise NotImplementedError('VPSchedule is not written yet')


def append_dims(*args, **kwargs):  # stub
    raise NotImplementedError('append_dims is not written yet')

