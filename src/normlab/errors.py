"""normlab's one exception type for bad arguments."""


class NormArgumentError(ValueError, RuntimeError):
    """A bad argument to a normlab op or module.

    A ValueError (the argument's value is wrong) and a RuntimeError (what torch raises
    for the same checks), so code written against either keeps working."""
