"""Measurement plumbing for benchmarks on a shared machine: waiting for other load, peak RSS.

* :func:`wait_quiet` — the 1-minute load average counts this benchmark's own threads
  (two busy threads hold it near 2 while it runs), so besides ``os.getloadavg()`` the
  check measures what *other* processes use: the busy share of ``/proc/stat`` (user,
  nice, system, irq, softirq, steal) over a short window in which this process sleeps.
* :class:`PeakRSS` — peak resident memory of a block above the resident memory at its
  start: ``gc.collect()`` and glibc ``malloc_trim(0)`` first (so memory freed by an
  earlier block is returned to the OS, not silently reused), then the kernel's
  high-water mark is reset (``echo 5 > /proc/self/clear_refs``, Linux >= 4.0) and read
  back from ``VmHWM`` at the end.  Linux only; elsewhere it reports ``None``.
"""
from __future__ import annotations

import ctypes
import gc
import os
import re
import time
from typing import Any

_LIBC: Any = None


def _busy_idle() -> tuple[int, int] | None:
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return sum(v[:8]) - idle, idle


def other_cpu(window: float = 0.5) -> float | None:
    """CPUs kept busy by other processes: busy jiffies during ``window`` s while we sleep."""
    a = _busy_idle()
    time.sleep(window)
    b = _busy_idle()
    if a is None or b is None:
        return None
    busy, idle = b[0] - a[0], b[1] - a[1]
    total = busy + idle
    return (busy / total) * (os.cpu_count() or 1) if total > 0 else 0.0


def wait_quiet(max_other: float = 0.5, max_load: float = 1.5, max_wait: float = 300.0, poll: float = 10.0
               ) -> dict[str, float | None]:
    """Wait (up to ``max_wait`` s) until other processes use at most ``max_other`` CPUs.

    Where ``/proc/stat`` is unreadable the 1-minute load average must be at most
    ``max_load`` instead.  Returns what was seen when the block starts:
    ``loadavg_1m``, ``other_cpus``, ``waited_s``.
    """
    t0 = time.perf_counter()
    while True:
        busy = other_cpu(1.0)
        load = os.getloadavg()[0]
        quiet = load <= max_load if busy is None else busy <= max_other
        if quiet or time.perf_counter() - t0 > max_wait:
            return {"loadavg_1m": round(load, 2), "other_cpus": None if busy is None else round(busy, 2),
                    "waited_s": round(time.perf_counter() - t0, 1)}
        time.sleep(poll)


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"^{field}:\s+(\d+)\s+kB", f.read(), re.M)
        return int(m.group(1)) if m else None
    except OSError:
        return None


def _trim() -> None:
    global _LIBC
    gc.collect()
    try:
        if _LIBC is None:
            _LIBC = ctypes.CDLL("libc.so.6")
        _LIBC.malloc_trim(0)
    except (OSError, AttributeError):
        _LIBC = False


class PeakRSS:
    """``with PeakRSS() as m: ...`` then ``m.mib``: peak RSS above the start, in MiB (``None`` if unknown)."""

    def __enter__(self) -> "PeakRSS":
        _trim()
        self.base = _status_kib("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.ok = self.base is not None
        except OSError:
            self.ok = False
        self.mib: float | None = None
        return self

    def __exit__(self, *exc) -> None:
        peak = _status_kib("VmHWM") if self.ok else None
        if peak is not None and self.base is not None:
            self.mib = max(0, peak - self.base) / 1024
