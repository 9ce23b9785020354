"""Params, errors, the input checks every entry point shares, progress bars."""

from jaxprune.core.params import (
    Params,
    get_path,
    set_path,
)
from jaxprune.core.checks import (
    is_real_dtype,
    check_tokens,
)
