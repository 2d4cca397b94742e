"""STUB: being written. Replace this whole file."""

__all__ = ['SigmaBins']


def SigmaBins(*args, **kwargs):  # stub
    raise NotImplementedError('SigmaBins is not written yet')

