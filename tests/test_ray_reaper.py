"""The Ray reaper reads every process's /proc entry: no other process may stop it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pipeline import ray_reaper


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_process_named_with_undecodable_bytes_does_not_stop_the_sweep() -> None:
    # Any program may name itself with any bytes; its /proc/PID/stat then holds them.
    code = (
        "import sys; open('/proc/self/comm', 'wb').write(b'\\xff\\xfe odd'); "
        "print('named', flush=True); sys.stdin.read()"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert child.stdin is not None and child.stdout is not None
    try:
        assert child.stdout.readline() == b"named\n"
        assert ray_reaper._parents()[child.pid] == os.getpid()
        assert ray_reaper._start_time(child.pid) is not None
    finally:
        child.stdin.close()
        child.wait(timeout=30)
