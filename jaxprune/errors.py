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
