"""STUB: being written. Replace this whole file."""

__all__ = ['ScoreFromEps', 'ScoreFromX0', 'ScoreFromV', 'EpsFromScore', 'DiffusersEpsAdapter']


def ScoreFromEps(*args, **kwargs):  # stub
    raise NotImplementedError('ScoreFromEps is not written yet')


def ScoreFromX0(*args, **kwargs):  # stub
    raise NotImplementedError('ScoreFromX0 is not written yet')


def ScoreFromV(*args, **kwargs):  # stub
    raise NotImplementedError('ScoreFromV is not written yet')


def EpsFromScore(*args, **kwargs):  # stub
    raise NotImplementedError('EpsFromScore is not written yet')


def DiffusersEpsAdapter(*args, **kwargs):  # stub
    raise NotImplementedError('DiffusersEpsAdapter is not written yet')

