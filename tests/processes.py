"""What tests read of this machine's processes, from /proc: who is whose child, and
whether a process is still running."""

from __future__ import annotations

from pathlib import Path


def parents() -> dict[int, int]:
    """Every process's parent: pid -> parent pid."""
    found: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text(errors="replace").rsplit(")", 1)[1].split()
            except OSError:
                continue
            found[int(entry.name)] = int(stat[1])
    return found


def descendants(pid: int) -> set[int]:
    """Every live process descended from `pid`."""
    tree = parents()
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {child for child, parent in tree.items() if parent in frontier} - found
        found |= frontier
    return found


def command(pid: int) -> bytes:
    """The process's command line (NUL-separated); empty once it is gone."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def alive(pid: int) -> bool:
    """Running, not gone and not a zombie waiting to be reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(errors="replace").rsplit(")", 1)[1].split()
    except OSError:
        return False
    return stat[0] != "Z"


def name(pid: int) -> str:
    """The process's name as `top` and `ps -o comm` show it (/proc/PID/comm)."""
    return Path(f"/proc/{pid}/comm").read_text().rstrip("\n")
