"""normlab's one exception type for bad arguments."""


class NormArgumentError(ValueError, RuntimeError):
    """A bad argument to a normlab op or module.

    A ValueError (the argument's value is wrong) and a RuntimeError (what torch raises
    for the same checks), so code written against either keeps working."""


class NormTypeError(NormArgumentError, TypeError):
    """An argument of the wrong type (an eps that is no number): also a TypeError, which
    is what torch raises for the same call."""


class NormDtypeError(NormArgumentError, NotImplementedError):
    """An input dtype normlab's ops do not run (integers, bool, complex): also a
    NotImplementedError, which is what torch raises for the same call ("not implemented
    for 'Long'"), so drop-in code that catches torch's type keeps working."""
