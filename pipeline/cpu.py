"""How busy the machine's CPUs were during a run, for the end-of-run hint.

When every core is busy, the stage whose queue stayed full is not short of
workers: the machine is short of cores, and more workers would only share the
same ones. The kernel's counters (/proc/stat) say so for the whole machine, the
embedding server or anything else beside the run included. Where they cannot
be read, the hint says nothing about the CPU.
"""

from __future__ import annotations

import os

__all__ = ["busy_seconds"]

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def busy_seconds() -> float | None:
    """CPU seconds the whole machine has spent busy since boot, all CPUs together."""
    try:
        with open("/proc/stat") as fh:
            fields = [int(v) for v in fh.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / _TICKS
