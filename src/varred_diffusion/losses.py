"""STUB: being written. Replace this whole file."""

__all__ = ['dsm_loss', 'perturb']


def dsm_loss(*args, **kwargs):  # stub
    raise NotImplementedError('dsm_loss is not written yet')


def perturb(*args, **kwargs):  # stub
    raise NotImplementedError('perturb is not written yet')

