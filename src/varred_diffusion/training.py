"""STUB: being written. Replace this whole file."""

__all__ = ['ControlledDSM']


def ControlledDSM(*args, **kwargs):  # stub
    raise NotImplementedError('ControlledDSM is not written yet')

