"""STUB: being written. Replace this whole file."""

__all__ = ['ControlVariate', 'stack_controls']


def ControlVariate(*args, **kwargs):  # stub
    raise NotImplementedError('ControlVariate is not written yet')


def stack_controls(*args, **kwargs):  # stub
    raise NotImplementedError('stack_controls is not written yet')

