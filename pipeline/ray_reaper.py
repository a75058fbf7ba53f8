"""Stop a local Ray instance's processes when the run that started it is killed.

`ray.shutdown()` stops what `ray.init()` started, but a driver killed with SIGKILL
runs no code: raylet and the GCS exit once they lose it, while agents they started
(the dashboard and runtime-env agents) are re-parented to init and live on. So a
run that starts its own Ray also starts this reaper: a small process that holds
the read end of a pipe from the run. While the run lives it notes, every half
second, every Ray process descended from the run (with its start time, so a reused
PID is never mistaken for one of them). When the pipe closes (the run ended,
however it ended) it gives Ray a moment to stop on its own, then kills whatever of
those processes is still there.

    python -m pipeline.ray_reaper DRIVER_PID
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["start_reaper"]

_TICK_S = 0.5
_GRACE_S = 3.0  # after the run ends: time for Ray's processes to stop by themselves


def start_reaper() -> subprocess.Popen[bytes]:
    """Start the reaper for this process; keep the returned handle open until the end."""
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.ray_reaper", str(os.getpid())],
        stdin=subprocess.PIPE,
        start_new_session=True,  # a Ctrl-C to the run's process group must not stop it
    )


def _start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(errors="replace")  # comm may be any bytes
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22: start time in clock ticks


def _parents() -> dict[int, int]:
    parents = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text(errors="replace")
        except OSError:
            continue
        parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    return parents


def _is_ray(pid: int) -> bool:
    """Ray's own processes (raylet, gcs_server, agents, workers): only those are swept."""
    try:
        return b"ray" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid, parent in _parents().items():
        children.setdefault(parent, []).append(pid)
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found and child != os.getpid():
                found.add(child)
                todo.append(child)
    return found


def _kill(seen: dict[int, str]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = [pid for pid, started in seen.items() if _start_time(pid) == started]
        for pid in alive:
            with contextlib.suppress(OSError):  # it exited meanwhile
                os.kill(pid, sig)
        if alive and sig == signal.SIGTERM:
            time.sleep(1.0)  # then SIGKILL what did not stop


def main(argv: list[str]) -> int:
    driver = int(argv[0])
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    seen: dict[int, str] = {}
    while True:
        for pid in _descendants(driver):
            if pid in seen or not _is_ray(pid):
                continue
            started = _start_time(pid)
            if started is not None:
                seen.setdefault(pid, started)
        ready, _, _ = select.select([sys.stdin.buffer], [], [], _TICK_S)
        if ready and not os.read(sys.stdin.fileno(), 1024):
            break  # the pipe closed: the run is over
    deadline = time.monotonic() + _GRACE_S
    while time.monotonic() < deadline and any(_start_time(p) == s for p, s in seen.items()):
        time.sleep(0.2)
    _kill(seen)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
