"""Error types raised at jaxprune's boundaries.

Every invalid input is rejected where it enters the library with one of these,
and the message names the offending value. Inside jit nothing is validated.
"""


class JaxpruneError(Exception):
    """Base class of every error jaxprune raises on purpose."""


class InvalidArgumentError(JaxpruneError, ValueError):
    """An argument has a bad value, shape or type."""


class CheckpointError(JaxpruneError, OSError):
    """A checkpoint is missing, truncated, corrupt or does not match its config."""


class UnsupportedModelError(JaxpruneError, ValueError):
    """The checkpoint describes an architecture jaxprune does not implement."""


class DataError(JaxpruneError, ValueError):
    """Text or token data is empty, too short or unreadable."""


def check_int(name: str, value, low: int = 1) -> int:
    """`value` as an int if it is an integer (not a bool) >= `low`, else InvalidArgumentError.

    Example:
        >>> check_int("batch_size", 8)
        8
    """
    import numpy as np
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        what = "a positive integer" if low == 1 else f"an integer >= {low}"
        raise InvalidArgumentError(f"{name} must be {what}, got {value!r}")
    return int(value)
