"""STUB: being written. Replace this whole file."""

__all__ = ['gauss_hermite_cubature', 'gaussian_polynomial_expectation', 'double_factorial', 'isserlis_pairings']


def gauss_hermite_cubature(*args, **kwargs):  # stub
    raise NotImplementedError('gauss_hermite_cubature is not written yet')


def gaussian_polynomial_expectation(*args, **kwargs):  # stub
    raise NotImplementedError('gaussian_polynomial_expectation is not written yet')


def double_factorial(*args, **kwargs):  # stub
    raise NotImplementedError('double_factorial is not written yet')


def isserlis_pairings(*args, **kwargs):  # stub
    raise NotImplementedError('isserlis_pairings is not written yet')

