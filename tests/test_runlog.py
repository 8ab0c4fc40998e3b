"""The run log: accounting of starts, stops and failures, the PostgreSQL mirror, the report."""

import json
import subprocess
import sys
import time
from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch

from krea2_train.config.schema import ResilienceConfig
from krea2_train.train.runlog import (
    RunLog,
    append_event,
    database_events,
    format_report,
    lost_incarnation_event,
    new_event,
    productive_step_time,
    read_events,
    start_supervision,
    summarize,
)
from krea2_train.train.watchdog import HeartbeatRecord, write_heartbeat


def event(kind, incarnation, when, step, **fields):
    return new_event(kind, incarnation=incarnation, rank=0, step=step, when=when, **fields)


def two_failures_run():
    """Start at t=0 (process up at -10), hang at 100 (step 50), restart recovers at 130 from the
    step-40 checkpoint, SIGKILLed run at 300 (step 120), recovers at 320 from step 120, done at 400."""
    return [
        event("start", 1, 0.0, 0, process_started=-10.0, resumed_step=0, steps_lost=None),
        event("first_step", 1, 5.0, 1, recovery_s=None),
        event("failure", 1, 100.0, 50, cause="hang", detail="no step finished"),
        event("failure", 1, 101.0, 50, cause="peer_hang", detail="another rank"),
        event("start", 2, 125.0, 40, process_started=115.0, resumed_step=40, steps_lost=10),
        event("first_step", 2, 130.0, 41, recovery_s=30.0),
        event("failure", 2, 300.0, 120, cause="lost", detail="SIGKILL"),
        event("start", 3, 318.0, 120, process_started=310.0, resumed_step=120, steps_lost=0),
        event("first_step", 3, 320.0, 121, recovery_s=20.0),
        event("stop", 3, 400.0, 160, reason="completed"),
    ]


def test_summary_mtbf_mttr_goodput_and_failures():
    steps = [{"step": s, "time": 0.0, "step_time_s": 2.0} for s in range(1, 161)]
    steps += [{"step": s, "time": 0.0, "step_time_s": 3.0} for s in range(41, 51)]  # re-run after the hang
    summary = summarize(two_failures_run(), steps)
    assert summary["incarnations"] == 3
    assert [(f["cause"], f["step"], f["steps_lost"], f["recovery_s"]) for f in summary["failures"]] == [
        ("hang", 50, 10, 30.0),  # the first failure of a start counts; the peer's is the same failure
        ("lost", 120, 0, 20.0),
    ]
    uptime = (100 - -10) + (300 - 115) + (400 - 310)
    assert summary["uptime_s"] == pytest.approx(uptime)
    assert summary["mtbf_s"] == pytest.approx(uptime / 2)
    assert summary["mttr_s"] == pytest.approx(25.0)
    assert summary["wall_s"] == pytest.approx(410.0)
    # productive time counts each step once, with the time of its last (kept) run
    assert summary["productive_s"] == pytest.approx(150 * 2.0 + 10 * 3.0)
    assert summary["goodput"] == pytest.approx(330.0 / 410.0)
    assert summary["steps_lost"] == 10
    # each restart's recovery split: 15 + 10 + 5 s, then 10 + 8 + 2 s
    assert summary["mttr_phases_s"] == pytest.approx({"relaunch": 12.5, "setup": 9.0, "first_step": 3.5})
    text = format_report("runs/x", summary)
    assert "MTBF             192.5 s" in text and "MTTR             25.0 s" in text and "goodput          80.5 %" in text
    assert "= relaunch 12.5 s (failure -> process up) + setup 9.0 s (imports, model, checkpoint) + first step 3.5 s" in text
    assert "hang" in text and "no step finished" in text
    # without the run's metrics.jsonl (runs report --from-db elsewhere) step time is unknown, not 0
    blind = summarize(two_failures_run(), [])
    assert blind["productive_s"] is None and blind["goodput"] is None
    assert "productive steps n/a" in format_report("runs/x", blind)


def test_a_tolerated_failed_save_is_reported_and_is_not_a_failure_of_the_run():
    events = [
        event("start", 1, 0.0, 0, process_started=0.0),
        event("checkpoint_failed", 1, 50.0, 20, detail="checkpoint step 20 could not be written to /ckpt: No space left on device"),
        event("stop", 1, 100.0, 40, reason="completed"),
    ]
    summary = summarize(events, [])
    assert summary["failures"] == [] and summary["mtbf_s"] is None and summary["uptime_s"] == pytest.approx(100.0)
    text = format_report("runs/x", summary)
    assert "0 failure(s)" in text
    assert "checkpoint saves that failed while training went on: 1" in text and "step 20  checkpoint step 20 could not" in text
    assert "saves that failed" not in format_report("runs/x", summarize(events[::2], []))


def test_checkpoint_interval_advice_is_youngs_optimum_and_never_below_a_write():
    from krea2_train.train.runlog import checkpoint_interval_advice

    assert checkpoint_interval_advice(None, 0, 1.0, 0.5, 3.0, 50) is None  # no failure yet: no MTBF
    advice = checkpoint_interval_advice(3600.0, 4, 0.5, 0.2, 10.0, 50)  # sqrt(2 x 0.2 x 3600) = 37.9 s
    assert advice["optimum_s"] == pytest.approx(37.947, rel=1e-4) and advice["advised_steps"] == 76
    assert not advice["limited_by_write"] and advice["interval_s"] == 25.0
    slow_write = checkpoint_interval_advice(3600.0, 4, 0.5, 0.2, 60.0, 50)  # an async save must finish first
    assert slow_write["limited_by_write"] and slow_write["advised_steps"] == 120


def test_summary_without_failures_and_an_empty_log():
    events = [event("start", 1, 0.0, 0, process_started=0.0), event("stop", 1, 10.0, 5, reason="completed")]
    summary = summarize(events, [])
    assert summary["mtbf_s"] is None and summary["mttr_s"] is None and summary["goodput"] is None
    with pytest.raises(ValueError, match="no events"):
        summarize([], [])


def test_productive_time_keeps_the_last_run_of_each_step():
    records = [{"step": 1, "step_time_s": 1.0}, {"step": 2, "step_time_s": 5.0}, {"step": 2, "step_time_s": 2.0}]
    assert productive_step_time(records) == 3.0


def test_a_start_that_left_no_record_is_a_lost_failure_dated_by_the_heartbeats(tmp_path):
    heartbeats = tmp_path / "heartbeats"
    heartbeats.mkdir()
    events = [event("start", 1, 100.0, 0), event("first_step", 1, 110.0, 1)]
    write_heartbeat(heartbeats, HeartbeatRecord(0, 7, 150.0, 170.0, "node-a", 11))
    write_heartbeat(heartbeats, HeartbeatRecord(1, 7, 150.5, 151.0, "node-b", 12))
    write_heartbeat(heartbeats, HeartbeatRecord(2, 99, 50.0, 50.0, "node-c", 13))  # from before this start
    lost = lost_incarnation_event(events, heartbeats)
    assert (lost["kind"], lost["cause"], lost["incarnation"], lost["step"], lost["time"]) == ("failure", "lost", 1, 7, 150.5)
    assert "rank 1's on node-b" in lost["detail"]
    assert lost_incarnation_event(events + [event("stop", 1, 200.0, 7, reason="completed")], heartbeats) is None
    # steps shorter than the heartbeat's period show in metrics.jsonl only: the newest dates the loss
    steps = [{"step": 8, "time": 150.8}, {"step": 9, "time": 151.2}, {"step": 3, "time": 90.0}]  # the last, of the start before
    lost = lost_incarnation_event(events, heartbeats, steps)
    assert (lost["step"], lost["time"]) == (9, 151.2)  # the heartbeats' newest step was 7, finished at 150.5


def resilience_config(run_name="r", **overrides):
    return SimpleNamespace(run_name=run_name, resilience=ResilienceConfig(watchdog=False, **overrides))


def test_supervision_records_starts_failures_recovery_and_steps_lost(tmp_path):
    config = resilience_config()
    first = start_supervision(config, tmp_path, rank=0, world_size=1, step=0, dsn=None)
    first.step_done(1)
    first.step_done(2)
    first.failed(5, RuntimeError("boom"))
    first.close()
    second = start_supervision(config, tmp_path, rank=0, world_size=1, step=4, dsn=None)
    second.step_done(5)
    second.stopped(8, "completed")
    second.close()
    kinds = [(e["incarnation"], e["kind"]) for e in read_events(tmp_path)]
    assert kinds == [(1, "start"), (1, "first_step"), (1, "failure"), (2, "start"), (2, "first_step"), (2, "stop")]
    events = read_events(tmp_path)
    assert events[2]["cause"] == "exception" and events[2]["detail"] == "RuntimeError: boom"
    assert events[3]["steps_lost"] == 1 and events[3]["resumed_step"] == 4
    assert events[4]["recovery_s"] > 0
    assert second.incarnation == 2


def test_a_restart_that_fails_before_its_first_step_does_not_end_the_repair(tmp_path):
    """Failure at step 5, a restart that dies in start-up, then one that trains: the recovery is
    measured from the first failure, and each start's steps_lost from the failure just before it."""
    config = resilience_config()
    first = start_supervision(config, tmp_path, rank=0, world_size=1, step=0, dsn=None)
    first.step_done(1)
    first.failed(5, RuntimeError("boom"))
    first.close()
    failed_at = read_events(tmp_path)[-1]["time"]
    second = start_supervision(config, tmp_path, rank=0, world_size=1, step=4, dsn=None)
    second.failed(4, RuntimeError("NCCL init"))  # before any step
    second.close()
    time.sleep(0.05)
    third = start_supervision(config, tmp_path, rank=0, world_size=1, step=4, dsn=None)
    third.step_done(5)
    third.close()
    events = read_events(tmp_path)
    starts = [e for e in events if e["kind"] == "start"]
    assert [e["steps_lost"] for e in starts] == [None, 1, 0]
    (recovered,) = [e for e in events if e["kind"] == "first_step" and e["incarnation"] == 3]
    assert recovered["recovery_s"] >= recovered["time"] - failed_at - 1e-3  # from the first failure, not the second


def test_logs_torn_by_a_crash_still_read(tmp_path):
    """A full disk or a crash can leave half a line at the end of metrics.jsonl or the run log."""
    from krea2_train.train.metrics import read_metrics

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n{"event": "checkpoint", "step": 1}\n{"step": 2, "lo')
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 0.5}]
    append_event(tmp_path, event("start", 1, 0.0, 0))
    with open(tmp_path / "runlog.jsonl", "a") as handle:
        handle.write('{"kind": "first_st')
    assert [e["kind"] for e in read_events(tmp_path)] == ["start"]
    with open(tmp_path / "runlog.jsonl", "ab") as handle:  # hand-edited lines: no time, not an object, not UTF-8
        handle.write(b'\n{"kind": "stop"}\n[1, 2]\n{"kind": "note", "time": 1.0, "text": "caf\xe9"}\n')
    assert [e["kind"] for e in read_events(tmp_path)] == ["start"]
    summarize(read_events(tmp_path), [])  # what `krea2 runs report` reads


def test_a_record_after_a_torn_line_starts_a_line_of_its_own(tmp_path):
    """A node that died mid-write leaves half a line with no newline: the next start's records
    (here its `lost` accounting, a re-trained step, a step's sample ids) must not be appended to it
    and skipped with it (the report said 0 failures, the loss curve lost the re-trained step)."""
    import torch

    from krea2_train.train.metrics import MetricsLogger, read_metrics
    from krea2_train.train.runlog import read_sample_ids

    append_event(tmp_path, event("start", 1, 0.0, 0, process_started=-1.0, resumed_step=0, steps_lost=None))
    with open(tmp_path / "runlog.jsonl", "a") as handle:
        handle.write('{"kind": "failure", "ti')
    append_event(tmp_path, event("failure", 1, 50.0, 12, cause="lost", detail="no record"))
    assert [e["kind"] for e in read_events(tmp_path)] == ["start", "failure"]
    assert len(summarize(read_events(tmp_path), [])["failures"]) == 1

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "lo')
    MetricsLogger(tmp_path, rank=0, total_steps=3).log_step(2, {"loss": 0.25}, step_time=1.0, print_line=False)
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path)] == [(1, 0.5), (2, 0.25)]

    supervision = start_supervision(resilience_config(record_sample_ids=True), tmp_path, rank=0, world_size=1, step=0, dsn=None)
    ids_file = tmp_path / "sample_ids" / "rank-00000.jsonl"
    ids_file.write_text('{"step": 1, "epoch": 0, "ids": [1], "incarnation": 1}\n{"step": 2, "epoch": 0, "ids": [3,')
    assert read_sample_ids(tmp_path) == {1: (0, [1])}  # the torn line is skipped, not a JSONDecodeError
    supervision.step_done(2, {"epoch": 0, "sample_ids": torch.tensor([3, 4])})
    supervision.close()
    assert read_sample_ids(tmp_path)[2] == (0, [3, 4])


def test_a_second_ctrl_c_is_recorded_as_a_stop_not_a_failure(tmp_path):
    """The operator asked for it: no MTBF failure, and the wait before a restart is no MTTR sample."""
    supervision = start_supervision(resilience_config(), tmp_path, rank=0, world_size=1, step=0, dsn=None)
    supervision.step_done(1)
    supervision.failed(3, KeyboardInterrupt())
    supervision.close()
    events = read_events(tmp_path)
    assert [(e["kind"], e.get("reason")) for e in events][-1] == ("stop", "interrupted")
    assert summarize(events, [])["failures"] == []


def test_the_progress_line_leaves_a_starts_first_step_out_of_the_rate_and_eta(tmp_path, caplog):
    """A resumed start's first step holds compilation and warm-up (60 s here, then 0.5 s steps):
    the line said 60 s/step and 99 h left, then 30 s/step and 50 h."""
    import logging

    from krea2_train.train.metrics import MetricsLogger

    metrics = MetricsLogger(tmp_path, rank=0, total_steps=10000)
    with caplog.at_level(logging.INFO, logger="krea2_train"):
        for step, seconds in ((4001, 60.0), (4002, 0.5), (4003, 0.5)):
            metrics.log_step(step, {"loss": 1.0}, step_time=seconds)
    lines = [record.getMessage() for record in caplog.records if record.getMessage().startswith("step ")]
    assert lines[0].startswith("step 4001/10000") and "60.00s/step" in lines[0] and lines[0].endswith("eta -")
    assert "0.50s/step" in lines[1] and lines[1].endswith("eta 49m59s")  # 0.5 s x 5998 steps
    assert "0.50s/step" in lines[2] and lines[2].endswith("eta 49m58s")


def test_sample_ids_are_recorded_behind_the_flag(tmp_path):
    import torch

    supervision = start_supervision(resilience_config(record_sample_ids=True), tmp_path, rank=0, world_size=2, step=0, dsn=None)
    supervision.step_done(1, {"epoch": 0, "sample_ids": torch.tensor([4, 9])})
    supervision.close()
    lines = (tmp_path / "sample_ids" / "rank-00000.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{"step": 1, "epoch": 0, "ids": [4, 9], "incarnation": 1, "world_size": 2}]


def test_sample_ids_of_a_step_trained_again_count_as_its_last_start(tmp_path):
    """Two ranks train steps 1-2 and die; one rank resumes from step 1 (another world size) and
    trains steps 2-3: step 2 is the second start's, with its one rank's ids, never both."""
    import torch

    from krea2_train.train.runlog import read_sample_ids

    config = resilience_config(record_sample_ids=True)
    first = [start_supervision(config, tmp_path, rank=rank, world_size=2, step=0, dsn=None) for rank in (0, 1)]
    first[1].run_log.incarnation = first[0].incarnation  # rank 0's decision, broadcast in a real run
    for step in (1, 2):
        for rank, supervision in enumerate(first):
            supervision.step_done(step, {"epoch": 0, "sample_ids": torch.tensor([4 * step + 2 * rank, 4 * step + 2 * rank + 1])})
    for supervision in first:
        supervision.close()
    second = start_supervision(config, tmp_path, rank=0, world_size=1, step=1, dsn=None)
    for step in (2, 3):
        second.step_done(step, {"epoch": 0, "sample_ids": torch.tensor([40 + step, 50 + step])})
    second.close()
    assert read_sample_ids(tmp_path) == {1: (0, [4, 5, 6, 7]), 2: (0, [42, 52]), 3: (0, [43, 53])}


@pytest.mark.postgres
def test_mirror_to_postgres_catches_up_after_an_outage(tmp_path, fresh_store):
    unreachable = "postgresql://nobody@127.0.0.1:1/none"
    log = RunLog(tmp_path, "mirror-run", rank=0, incarnation=1, dsn=unreachable)
    log.record("start", 0, resumed_step=0)
    log.record("failure", 3, cause="hang", detail="stuck")
    assert log.mirror_now() is False  # logged, not raised
    log.close()
    log = RunLog(tmp_path, "mirror-run", rank=0, incarnation=2, dsn=fresh_store.dsn)
    log.record("start", 2, resumed_step=2)
    log.record("checkpoint_failed", 4, detail="checkpoint step 4 could not be written")  # every kind the table takes
    assert log.mirror_now() is True
    log.close()
    with fresh_store.pool.connection() as conn:
        stored = database_events(conn, "mirror-run")
        assert log.mirror_now() is True  # idempotent
        assert len(database_events(conn, "mirror-run")) == 4
    local = read_events(tmp_path)
    assert [e["id"] for e in stored] == [e["id"] for e in local]
    assert stored[1]["cause"] == "hang" and stored[1]["step"] == 3
    assert stored[1]["time"] == pytest.approx(local[1]["time"], abs=1e-3)


@pytest.mark.postgres
def test_the_database_report_tells_apart_runs_that_shared_a_name(tmp_path, fresh_store, caplog):
    """A run directory moved away, then a new run of the same name: `runs report --from-db` read
    both runs' events as one (3 starts and the old run's failure where the new one had 1 start).
    A run whose first start predates run ids keeps its older events."""
    config = resilience_config()  # run_name "r"
    for name in ("old", "new", "legacy"):
        (tmp_path / name).mkdir()
    old = start_supervision(config, tmp_path / "old", rank=0, world_size=1, step=0, dsn=fresh_store.dsn)
    old.step_done(1)
    old.failed(2, RuntimeError("boom"))
    old.close()
    new = start_supervision(config, tmp_path / "new", rank=0, world_size=1, step=0, dsn=fresh_store.dsn)
    new.step_done(1)
    new.stopped(6, "completed")
    new.close()
    with fresh_store.pool.connection() as conn:
        events = database_events(conn, "r")
    assert [e["id"] for e in events] == [e["id"] for e in read_events(tmp_path / "new")]
    assert summarize(events, [])["failures"] == [] and "1 other run(s) named 'r'" in caplog.text

    legacy_dir = tmp_path / "legacy"  # events mirrored before run ids, then a start of this version
    legacy = RunLog(legacy_dir, "l", rank=0, incarnation=1, dsn=fresh_store.dsn)
    legacy.record("start", 0, resumed_step=0)
    legacy.record("failure", 3, cause="hang", detail="stuck")
    legacy.close()
    resumed = start_supervision(resilience_config(run_name="l"), legacy_dir, rank=0, world_size=1, step=2, dsn=fresh_store.dsn)
    resumed.close()
    with fresh_store.pool.connection() as conn:
        events = database_events(conn, "l")
    assert [e["kind"] for e in events] == ["start", "failure", "start"]
    assert events[2]["run_id"] == events[0]["id"]


def test_closing_the_run_log_does_not_wait_for_a_database_that_never_answers(tmp_path, monkeypatch):
    """A hung server (or a partition) leaves the mirror's statement unanswered: closing the log,
    the first thing a run's exit does, gives up after its timeout; the events stay in the file."""
    import threading

    from krea2_train.train import runlog

    hung = threading.Event()
    monkeypatch.setattr(runlog, "mirror_events", lambda *args: hung.wait())
    monkeypatch.setattr("psycopg.connect", lambda *args, **kwargs: nullcontext())
    log = RunLog(tmp_path, "hung-run", rank=0, incarnation=1, dsn="postgresql://nobody@127.0.0.1:1/none")
    log.record("start", 0, resumed_step=0)
    closing = threading.Thread(target=log.close, kwargs={"timeout_s": 0.5}, daemon=True)
    closing.start()
    closing.join(10)
    assert not closing.is_alive()
    assert [event["kind"] for event in read_events(tmp_path)] == ["start"]
    hung.set()


def test_runs_report_command(tmp_path):
    run_dir = tmp_path / "runs" / "demo"
    run_dir.mkdir(parents=True)
    for item in two_failures_run():
        append_event(run_dir, item)
    (run_dir / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "time": time.time(), "step_time_s": 2.0}) + "\n" for s in range(1, 161))
    )
    # two committed checkpoints, their manifests saying each blocked training 0.5 s and took 3 s to write
    from krea2_train.train.checkpoint import CheckpointManager

    manager = CheckpointManager(run_dir, interval=40, async_mode="sync")
    for step in (120, 160):
        manager.save(step, {"weights": torch.zeros(4)})
        manifest_path = run_dir / "checkpoints" / f"step-{step:08d}" / "manifest.json"
        manifest_path.write_text(json.dumps({**json.loads(manifest_path.read_text()), "blocked_s": 0.5, "write_s": 3.0}))
    (run_dir / "config.yaml").write_text("checkpoint:\n  interval: 40\n")
    result = subprocess.run(
        [sys.executable, "-m", "krea2_train.cli", "runs", "report", "demo", "--runs-root", str(tmp_path / "runs"),
         "--json", str(tmp_path / "report.json")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "2 failure(s)" in result.stdout and "MTTR             25.0 s" in result.stdout
    # MTBF 192.5 s: sqrt(2 x 0.5 x 192.5) = 13.9 s, 7 steps of 2 s
    assert ("checkpoints      every 40 steps (80.0 s); for this failure rate every 7 steps loses the least "
            "(sqrt(2 x 0.5 s blocked x 192 s MTBF) = 13.9 s; from 2 failure(s))") in result.stdout
    assert json.loads((tmp_path / "report.json").read_text())["failures"][1]["cause"] == "lost"
    missing = subprocess.run([sys.executable, "-m", "krea2_train.cli", "runs", "report", "nope", "--runs-root", str(tmp_path)],
                             capture_output=True, text=True)
    assert missing.returncode != 0 and "neither a run directory nor a run under" in missing.stderr
    # a directory of the same name in the working directory that is not a run does not shadow it
    (tmp_path / "demo").mkdir()
    shadowed = subprocess.run([sys.executable, "-m", "krea2_train.cli", "runs", "report", "demo", "--runs-root", "runs"],
                              capture_output=True, text=True, cwd=tmp_path)  # fmt: skip
    assert shadowed.returncode == 0 and "2 failure(s)" in shadowed.stdout, shadowed.stderr
    # an unreachable database is named in one line, not a traceback
    unreachable = subprocess.run([sys.executable, "-m", "krea2_train.cli", "runs", "report", "demo", "--runs-root", "runs",
                                  "--from-db", "--dsn", "postgresql://krea2:secret@127.0.0.1:9/runs"],
                                 capture_output=True, text=True, cwd=tmp_path)  # fmt: skip
    assert unreachable.returncode == 1 and "krea2: error: cannot reach PostgreSQL at 127.0.0.1:9/runs" in unreachable.stderr
    assert "Traceback" not in unreachable.stderr and "secret" not in unreachable.stderr



def test_a_second_start_of_a_live_run_on_this_host_is_refused(tmp_path):
    """Run twice by mistake: the second start must not fence the first out and record its stop as
    a failure. A live process with a fresh heartbeat refuses; a dead one, or a stale beat, does not."""
    import socket
    import subprocess
    import sys
    import time

    from krea2_train.train.runlog import another_start_running
    from krea2_train.train.watchdog import HeartbeatRecord, write_heartbeat

    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        now, host = time.time(), socket.gethostname()
        write_heartbeat(tmp_path, HeartbeatRecord(rank=1, step=12, progress_time=now, beat_time=now, host=host, pid=alive.pid))
        refusal = another_start_running(tmp_path, 30.0, "pretrain_256")
        assert f"run 'pretrain_256' is running already: rank 1 of another start is alive on this host (pid {alive.pid}, step 12" in refusal
        write_heartbeat(tmp_path, HeartbeatRecord(rank=1, step=12, progress_time=now - 60, beat_time=now - 60, host=host, pid=alive.pid))
        assert another_start_running(tmp_path, 30.0, "pretrain_256") is None  # a stale beat: a hung or paused start
        write_heartbeat(tmp_path, HeartbeatRecord(rank=1, step=12, progress_time=now, beat_time=now, host="another-node", pid=alive.pid))
        assert another_start_running(tmp_path, 30.0, "pretrain_256") is None  # not checkable here: the data lease fences it
    finally:
        alive.kill()
        alive.wait()
    write_heartbeat(tmp_path, HeartbeatRecord(rank=1, step=12, progress_time=time.time(), beat_time=time.time(), host=host, pid=alive.pid))
    assert another_start_running(tmp_path, 30.0, "pretrain_256") is None  # its process has ended
