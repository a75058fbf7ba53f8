"""Name a child process after its work, where `top`, `ps -o comm` and `pgrep` look.

Every process of a run is `python` otherwise: the extraction workers, the
embedder's process and the Edge store's look the same, and an operator (or
bench.throughput, which reports CPU per process) cannot tell which one is busy.
Linux keeps a 15-byte name per process (`/proc/PID/comm`, which htop shows in its
COMM column; its Command column stays the command line). Elsewhere this does nothing.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["comm_name", "set_process_name"]

_MAX_BYTES = 15  # the kernel's TASK_COMM_LEN, less the terminating NUL
_COMM = Path("/proc/self/comm")


def comm_name(name: str) -> str:
    """`name` as the kernel keeps it: its first 15 bytes of UTF-8, never half a
    character (a cut character would make /proc/PID/comm undecodable)."""
    return name.encode("utf-8")[:_MAX_BYTES].decode("utf-8", "ignore")


def set_process_name(name: str) -> bool:
    """Name this process `comm_name(name)`; returns whether the system took it."""
    try:
        _COMM.write_text(comm_name(name), encoding="utf-8")
    except OSError:  # not Linux
        return False
    return True
