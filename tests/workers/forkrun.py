"""Run one call in a forked child, measured and bounded: the fork server of the hostile-file and
write-fault workers.

The worker imports jaxprune (and everything a call needs) once, without starting JAX's runtime;
each call then runs in a child forked from it, so hundreds of calls cost no start-up, a call that
hangs or balloons is killed without harming the others, and the child's peak resident memory
(Linux VmHWM, reset when it starts) is its own.

    result = run_forked(lambda: jp.load(path), timeout=3.0)
    result -> {"ok": False, "type": "CheckpointError", "jaxprune": True, "message": "...",
               "seconds": 0.01, "peak_bytes": 1234}   (or "type": "timeout" / "memory")
"""

from __future__ import annotations

import json
import os
import select
import signal
import time


def status(field: str, pid: str = "self") -> int:
    """A /proc/PID/status size field (VmRSS, VmHWM) in bytes; 0 when the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":")), 0)
    except OSError:
        return 0


def reset_peak() -> None:
    """Make VmHWM the current resident size (so the peak measured is this call's)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def describe(e: BaseException) -> dict:
    from jaxprune.errors import JaxpruneError
    return {"ok": False, "type": type(e).__name__, "jaxprune": isinstance(e, JaxpruneError),
            "message": str(e)[:4000]}


def spawn(fn, setup=None) -> tuple[int, int]:
    """Fork a child that runs `setup()`, writes ``R`` (ready) to a pipe, runs `fn()` and writes a
    JSON result line; returns (pid, read end of the pipe). The child always ends with os._exit."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:   # the child
        os.close(r)
        code = 0
        try:
            if setup is not None:
                setup()
            os.write(w, b"R")   # ready: the parent may start its clock (or its kill timer) now
            reset_peak()
            base = status("VmRSS")
            t0 = time.perf_counter()
            try:
                value = fn()
                out = {"ok": True, "value": value if isinstance(value, (str, int, float, bool, type(None), list, dict)) else None}
            except BaseException as e:   # noqa: BLE001 - every outcome is reported to the parent
                out = describe(e)
            out["seconds"] = time.perf_counter() - t0
            out["peak_bytes"] = max(0, status("VmHWM") - base)
            data = (json.dumps(out) + "\n").encode()
            while data:
                data = data[os.write(w, data):]
        except BaseException:   # noqa: BLE001
            code = 3
        finally:
            os._exit(code)
    os.close(w)
    return pid, r


def wait_ready(r: int, timeout: float = 120.0) -> bytes:
    """Block until a spawned child has run its setup (its ``R``); returns anything read after it."""
    ready, _, _ = select.select([r], [], [], timeout)
    return os.read(r, 1) if ready else b""


def collect(pid: int, r: int, timeout: float, max_rss: int = 1 << 30, kill_at: float | None = None,
            started: bool = False) -> dict:
    """Wait for a spawned child: its result, or {"type": "timeout"/"memory"/"killed"} when it ran past
    `timeout` s, grew past `max_rss` bytes, or was SIGKILLed `kill_at` s after its setup finished (a
    write-fault test). The clock starts at the child's ``R`` (or now, if `started`: already read)."""
    data, verdict = b"", None
    start = time.monotonic() if started else None
    setup_deadline = time.monotonic() + 300
    while True:
        now = time.monotonic()
        wait = 0.01 if kill_at is None or start is None else max(0.0, min(0.01, start + kill_at - now))
        ready, _, _ = select.select([r], [], [], wait)
        if ready:
            chunk = os.read(r, 1 << 16)
            if not chunk:
                break
            if start is None and chunk.startswith(b"R"):
                start, chunk = time.monotonic(), chunk[1:]
            data += chunk
            continue
        now = time.monotonic()
        if start is None:
            if now > setup_deadline:
                verdict = "timeout"
                os.kill(pid, signal.SIGKILL)
                break
            continue
        elapsed = now - start
        if kill_at is not None and elapsed >= kill_at:
            verdict = "killed"
        elif elapsed > timeout:
            verdict = "timeout"
        elif status("VmRSS", str(pid)) > max_rss:
            verdict = "memory"
        if verdict:
            os.kill(pid, signal.SIGKILL)
            break
    os.close(r)
    _, code = os.waitpid(pid, 0)
    if verdict or not data.strip():
        return {"ok": False, "type": verdict or f"exit {code}", "jaxprune": False, "message": "",
                "seconds": time.monotonic() - (start or time.monotonic()), "peak_bytes": 0, "status": code}
    out = json.loads(data.decode().splitlines()[0])
    out["status"] = code
    return out


def run_forked(fn, timeout: float = 3.0, max_rss: int = 1 << 30, setup=None) -> dict:
    """`fn()` in a forked child, bounded by `timeout` seconds and `max_rss` bytes of growth."""
    base = status("VmRSS")
    pid, r = spawn(fn, setup)
    return collect(pid, r, timeout, base + max_rss)
