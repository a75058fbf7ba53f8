"""Name a child process after its work, where `top`, `htop` and `ps -o comm` look.

Every process of a run is `python` otherwise: the extraction workers, the
embedder's process and the Edge store's look the same, and an operator (or
bench.throughput, which reports CPU per process) cannot tell which one is busy.
Linux keeps a 15-byte name per thread (`/proc/PID/comm`); the main thread's is the
process's. Elsewhere this does nothing.
"""

from __future__ import annotations

import ctypes
import sys

__all__ = ["set_process_name"]

_PR_SET_NAME = 15  # linux/prctl.h
_MAX_BYTES = 15  # the kernel's TASK_COMM_LEN, less the terminating NUL


def set_process_name(name: str) -> bool:
    """Name the calling thread (the process, from its main thread) `name`, cut to 15
    bytes; returns whether the system took it."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return False
    raw = name.encode("utf-8", "replace")[:_MAX_BYTES]
    result: int = prctl(_PR_SET_NAME, ctypes.c_char_p(raw), 0, 0, 0)
    return result == 0
