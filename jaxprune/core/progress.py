"""Progress bars for long work (rich), quiet when not attached to a terminal.

Example:
    >>> for _ in progress(range(3), "demo", enabled=False):
    ...     pass
"""

from __future__ import annotations

import os
import sys


def _auto() -> bool:
    if os.environ.get("JAXPRUNE_PROGRESS") in ("0", "1"):
        return os.environ["JAXPRUNE_PROGRESS"] == "1"
    return sys.stderr.isatty()


def progress(iterable, description: str, total: int | None = None, enabled: bool | None = None):
    """Iterate with a rich progress bar on stderr; `enabled=None` shows it on a terminal
    (or when JAXPRUNE_PROGRESS=1)."""
    if enabled is None:
        enabled = _auto()
    if not enabled:
        yield from iterable
        return
    from rich.console import Console
    from rich.progress import track
    yield from track(iterable, description=description, total=total, transient=True,
                     console=Console(stderr=True))
