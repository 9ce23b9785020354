"""Host memory: giving freed memory back to the operating system (an explicit, opt-in call)."""

from __future__ import annotations


def return_freed_memory() -> None:
    """Ask glibc to give large freed blocks back to the OS at once (a fixed mmap threshold of 1 MiB
    and no trim threshold), so the peak resident size follows what is live, not what was ever
    allocated.

    Process-wide and never undone, so jaxprune never calls it for you: call it once before
    `prune_streaming` when peak memory matters more than allocation speed (``jaxprune prune
    --stream`` does). A no-op where glibc is absent."""
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 20)   # M_MMAP_THRESHOLD
        libc.mallopt(-1, 0)         # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass
