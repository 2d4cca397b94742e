"""STUB: being written. Replace this whole file."""

__all__ = ['GradientControl']


def GradientControl(*args, **kwargs):  # stub
    raise NotImplementedError('GradientControl is not written yet')

