"""The hang watchdog in one process: its rules, its report, naming silent ranks, its exit."""

import os
import signal
import subprocess
import sys
import time

import pytest

from krea2_train.train.watchdog import (
    HANG_MARKER,
    HeartbeatRecord,
    Watchdog,
    read_heartbeats,
    silent_ranks,
    write_heartbeat,
)


def make_watchdog(tmp_path, **overrides):
    settings = dict(
        rank=0, world_size=2, hang_timeout_s=30.0, first_step_timeout_s=60.0, slow_step_factor=4.0, slow_step_min_s=0.5,
        poll_interval_s=0.05, heartbeat_stale_s=1.0, exit_code=75,
    )
    settings.update(overrides)
    return Watchdog(tmp_path / "run", tmp_path / "run" / "heartbeats", **settings)


def test_heartbeat_files_round_trip(tmp_path):
    record = HeartbeatRecord(rank=3, step=17, progress_time=100.5, beat_time=101.25, host="node-a", pid=4242)
    write_heartbeat(tmp_path, record)
    (tmp_path / "rank-00009").write_text("garbage")  # a torn or foreign file is skipped
    assert read_heartbeats(tmp_path) == {3: record}


def test_no_progress_and_slow_step_rules(tmp_path):
    watchdog = make_watchdog(tmp_path, hang_timeout_s=10.0, first_step_timeout_s=20.0)
    watchdog._progress_mono = 0.0
    assert watchdog.check(19.0) is None  # before the first step, the first-step limit applies
    assert watchdog.check(21.0)[0] == "hang"
    watchdog._durations.extend([0.1] * 5)
    watchdog.steps_done = 5
    assert watchdog.check(0.45) is None  # 4.5 x the median but under slow_step_min_s
    cause, detail = watchdog.check(0.6)
    assert cause == "slow_step" and "median step time 0.100" in detail
    with watchdog.slow_section():  # sample grids and final waits: only the no-progress rule
        watchdog._progress_mono = 0.0
        assert watchdog.check(5.0) is None
        assert watchdog.check(10.5)[0] == "hang"
    with watchdog.slow_section(limit_s=60.0):  # a checkpoint: its own, longer no-progress limit
        watchdog._progress_mono = 0.0
        assert watchdog.check(59.0) is None
        cause, detail = watchdog.check(61.0)
        assert cause == "hang" and "limit 60 s" in detail
    watchdog._progress_mono = 0.0
    assert watchdog.check(10.5)[0] == "hang"  # left: the step's limit again


def test_beat_times_steps_but_not_slow_sections(tmp_path):
    watchdog = make_watchdog(tmp_path)
    watchdog.beat(1)
    watchdog.beat(2)
    with watchdog.slow_section():
        pass
    watchdog.beat(3)
    assert watchdog.step == 3 and watchdog.steps_done == 3 and len(watchdog._durations) == 2


def test_silent_ranks_names_stale_stopped_and_gone_processes():
    stopped = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    try:
        os.kill(stopped.pid, signal.SIGSTOP)
        time.sleep(0.2)
        now = 1000.0
        records = {
            0: HeartbeatRecord(0, 5, now - 1, now - 0.5, "here", os.getpid()),
            1: HeartbeatRecord(1, 5, now - 1, now - 9.0, "here", stopped.pid),
            2: HeartbeatRecord(2, 4, now - 3, now - 0.2, "here", gone.pid),
            3: HeartbeatRecord(3, 5, now - 1, now - 9.0, "elsewhere", 1),
        }
        silent = silent_ranks(records, now, stale_s=5.0, host="here")
        assert sorted(silent) == [1, 2, 3]
        assert "process stopped" in silent[1] and "heartbeat stopped 9.0 s ago" in silent[1]
        assert "process gone" in silent[2]
        assert "elsewhere" in silent[3]
    finally:
        stopped.kill()
        stopped.wait()


def test_trip_dumps_stacks_names_silent_rank_reports_and_exits(tmp_path):
    exits, trips = [], []
    watchdog = make_watchdog(tmp_path, exit=exits.append, on_trip=lambda *args: trips.append(args))
    watchdog.start(step=7)
    silent_peer = HeartbeatRecord(1, 7, time.time() - 30, time.time() - 30, "another-host", 1)
    write_heartbeat(watchdog.heartbeat_dir, silent_peer)
    watchdog.trip("hang", "no step finished for 31.0 s")
    watchdog.stop()
    assert exits == [75]
    cause, detail, step, report = trips[0]
    assert (cause, step) == ("hang", 7) and "rank 1 on another-host" in detail
    text = report.read_text()
    assert report.parent == tmp_path / "run" / "hangs"
    assert "silent ranks: rank 1 on another-host" in text
    assert "test_trip_dumps_stacks_names_silent_rank_reports_and_exits" in text  # this thread's stack
    assert "krea2-watchdog-rank0" in text or "Thread 0x" in text  # every thread is dumped
    assert (watchdog.heartbeat_dir / HANG_MARKER).read_text().startswith("rank 0")


def test_a_peer_trip_makes_every_rank_dump(tmp_path):
    exits, trips = [], []
    watchdog = make_watchdog(tmp_path, exit=exits.append, on_trip=lambda *args: trips.append(args))
    watchdog.start(step=2)
    (watchdog.heartbeat_dir / HANG_MARKER).write_text("rank 1 at 0: hang\n")
    deadline = time.monotonic() + 30
    while not exits and time.monotonic() < deadline:
        time.sleep(0.05)
    watchdog.stop()
    assert exits == [75] and trips[0][0] == "peer_hang" and trips[0][3].exists()


def test_a_marker_from_an_earlier_start_is_ignored(tmp_path):
    watchdog = make_watchdog(tmp_path)
    watchdog.heartbeat_dir.mkdir(parents=True)
    marker = watchdog.heartbeat_dir / HANG_MARKER
    marker.write_text("old")
    os.utime(marker, (time.time() - 3600, time.time() - 3600))
    watchdog.start(step=0)
    try:
        assert watchdog.check(time.monotonic()) is None
    finally:
        watchdog.stop()


@pytest.mark.parametrize("exit_code", [75, 3])
def test_watchdog_exits_a_stuck_process_with_its_code(tmp_path, exit_code):
    """A real process whose main thread never finishes a step: the watchdog ends it."""
    script = f"""
import time
from pathlib import Path
from krea2_train.train.watchdog import Watchdog
run = Path({str(tmp_path)!r})
Watchdog(run, run / "heartbeats", rank=0, world_size=1, hang_timeout_s=0.5, first_step_timeout_s=0.5,
         slow_step_factor=10, slow_step_min_s=60, poll_interval_s=0.05, heartbeat_stale_s=5,
         exit_code={exit_code}).start(step=0)
time.sleep(120)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == exit_code
    (report,) = (tmp_path / "hangs").glob("rank-0-*.txt")
    text = report.read_text()
    assert "no first step finished" in text and 'File "<string>"' in text  # the stuck main thread's stack
