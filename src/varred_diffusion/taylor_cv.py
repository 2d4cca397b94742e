"""STUB: being written. Replace this whole file."""

__all__ = ['dsm_taylor_cv']


def dsm_taylor_cv(*args, **kwargs):  # stub
    raise NotImplementedError('dsm_taylor_cv is not written yet')

