#!/usr/bin/env bash
# The body of train_single_node.sbatch and train_multi_node.sbatch (docs/operations.md).
#
#   run_training.sh --config stage/NAME [key=value ...]      (inside a Slurm allocation)
#
# - one torchrun launcher per node (srun), rendezvous at the first node of the allocation, with
#   --max-restarts: a failed rank restarts the whole group, which resumes from the newest
#   checkpoint;
# - the run directory is runs_root/run_name, fixed by the environment, so a requeued or
#   resubmitted job continues the same run by itself;
# - USR1 before the time limit (sbatch --signal=B:USR1@SECONDS): the trainers checkpoint and go
#   on, and after KREA2_CHECKPOINT_GRACE_S the job requeues itself (unless the run finished);
# - a SIGTERM to the step alone: the trainers checkpoint and stop (the run log says so); the job
#   ends without blaming a node;
# - a failure the restarts did not cure: every node is checked (node_check.sh), the nodes that
#   fail are added to the faulty-node list, and the job is resubmitted excluding every listed node;
# - a job that lands on a listed node resubmits itself elsewhere at once;
# - a run that stopped on an error a restart meets again (the trainer wrote
#   runs_root/run_name/user_error.txt during this job: a foreign checkpoint, a bad setting) is not
#   resubmitted: the job ends with the message.
#
# Environment (defaults in brackets):
#   KREA2_RUN_NAME (required)     the run; also the directory under KREA2_RUNS_ROOT
#   KREA2_HOME [$SLURM_SUBMIT_DIR] the repository; KREA2_RUNS_ROOT [$KREA2_HOME/runs]
#   KREA2_EXCLUDE_FILE [$KREA2_RUNS_ROOT/faulty_nodes.txt]  one host name per line, # comments
#   KREA2_GPUS_PER_NODE [$SLURM_GPUS_ON_NODE or 1]  KREA2_MAX_RESTARTS [3]
#   KREA2_RDZV_PORT [20000 + job id mod 10000: jobs sharing a head node do not share a store;
#                    a one-node job without it uses torchrun --standalone, a free port]
#   KREA2_CHECKPOINT_GRACE_S [120]  KREA2_SBATCH_SCRIPT (set by the .sbatch)
#   KREA2_MAX_RESUBMITS [5]  resubmissions in a row without progress: a newer checkpoint than the
#                            one at the last resubmission (KREA2_RESUBMIT_STEP) resets the count,
#                            also in a job Slurm requeued itself
set -euo pipefail

repo="${KREA2_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}"
# shellcheck source=launch/env.sh
source "$repo/launch/env.sh"

run_name="${KREA2_RUN_NAME:?set KREA2_RUN_NAME: requeued and resubmitted jobs continue the run of that name}"
runs_root="${KREA2_RUNS_ROOT:-$repo/runs}"
exclude_file="${KREA2_EXCLUDE_FILE:-$runs_root/faulty_nodes.txt}"
gpus_per_node="${KREA2_GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}"
max_restarts="${KREA2_MAX_RESTARTS:-3}"
rdzv_port="${KREA2_RDZV_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 10000))}"
grace_s="${KREA2_CHECKPOINT_GRACE_S:-120}"
export KREA2_CHECKPOINT_GRACE_S="$grace_s"  # the trainers warn when their checkpoint takes longer
max_resubmits="${KREA2_MAX_RESUBMITS:-5}"
resubmits="${KREA2_RESUBMIT_COUNT:-0}"
sbatch_script="${KREA2_SBATCH_SCRIPT:?set by the .sbatch file: the script a resubmission runs}"
num_nodes="${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}"
train_args=("$@")

log() { echo "krea2 [job ${SLURM_JOB_ID:-?} $(date '+%F %T')]: $*"; }

mkdir -p "$runs_root" "$(dirname "$exclude_file")"
touch "$exclude_file"
mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
head_node="${nodes[0]}"

listed_nodes() {  # the faulty-node list: one host per line, without comments and blanks
    sed -e 's/#.*//' -e 's/[[:space:]]//g' "$exclude_file" | grep -v '^$' || true
}
excluded_list() { listed_nodes | sort -u | paste -sd, - || true; }

latest_step() {  # the step of the run's newest committed checkpoint (0 without one)
    local dir step=0
    for dir in "$runs_root/$run_name"/checkpoints/step-[0-9]*; do  # zero-padded: the last is the newest
        [[ -d "$dir" && "$dir" != *.tmp* ]] && step=$((10#${dir##*/step-}))
    done
    echo "$step"
}
start_step="$(latest_step)"
# the run's newest checkpoint when the count last grew (a job submitted without it: this job's start)
resubmitted_at_step="${KREA2_RESUBMIT_STEP:-$start_step}"

job_options() {  # the submission's own options that a new job must keep (command-line ones beat #SBATCH lines)
    local job time_limit features
    job="$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null || true)"
    time_limit="$(sed -n 's/.*TimeLimit=\([^ ]*\).*/\1/p' <<<"$job" | head -n 1)"
    features="$(sed -n 's/.*[[:space:]]Features=\([^ ]*\).*/\1/p' <<<"$job" | head -n 1)"  # the requested --constraint
    echo "--job-name=${SLURM_JOB_NAME:-krea2}"
    [[ -n "${SLURM_JOB_PARTITION:-}" ]] && echo "--partition=$SLURM_JOB_PARTITION"
    [[ -n "${SLURM_JOB_ACCOUNT:-}" ]] && echo "--account=$SLURM_JOB_ACCOUNT"
    [[ -n "${SLURM_JOB_QOS:-}" ]] && echo "--qos=$SLURM_JOB_QOS"
    [[ -n "${SLURM_JOB_RESERVATION:-}" ]] && echo "--reservation=$SLURM_JOB_RESERVATION"
    [[ -n "${SLURM_GPUS_PER_NODE:-}" ]] && echo "--gpus-per-node=$SLURM_GPUS_PER_NODE"
    [[ -n "${SLURM_CPUS_PER_TASK:-}" ]] && echo "--cpus-per-task=$SLURM_CPUS_PER_TASK"
    [[ -n "$time_limit" && "$time_limit" != UNLIMITED && "$time_limit" != Partition_Limit ]] && echo "--time=$time_limit"
    # memory (Slurm exports the one the job asked for, in MB) and node features
    if [[ -n "${SLURM_MEM_PER_NODE:-}" ]]; then echo "--mem=${SLURM_MEM_PER_NODE}M"
    elif [[ -n "${SLURM_MEM_PER_CPU:-}" ]]; then echo "--mem-per-cpu=${SLURM_MEM_PER_CPU}M"
    elif [[ -n "${SLURM_MEM_PER_GPU:-}" ]]; then echo "--mem-per-gpu=${SLURM_MEM_PER_GPU}M"
    fi
    [[ -n "$features" && "$features" != "(null)" ]] && echo "--constraint=$features"
    return 0
}

resubmit() {  # resubmit() REASON: a new job for the same run, excluding every listed node
    local step excluded options
    step="$(latest_step)"
    if (( resubmits > 0 && step > resubmitted_at_step )); then
        log "the run advanced from checkpoint step $resubmitted_at_step to $step since its last resubmission: the resubmission count starts again"
        resubmits=0
    fi
    if (( resubmits >= max_resubmits )); then
        log "not resubmitting ($1): already resubmitted $resubmits time(s) without progress (KREA2_MAX_RESUBMITS=$max_resubmits)"
        return 1
    fi
    excluded="$(excluded_list)"
    mapfile -t options < <(job_options)
    log "resubmitting ($1), excluding: ${excluded:-none}"
    # a new job, not a requeue: this job's restart count must not travel with --export=ALL
    env -u SLURM_RESTART_COUNT sbatch ${excluded:+--exclude="$excluded"} --nodes="$num_nodes" "${options[@]}" \
        --export="ALL,KREA2_RUN_NAME=$run_name,KREA2_RUNS_ROOT=$runs_root,KREA2_RESUBMIT_COUNT=$((resubmits + 1)),KREA2_RESUBMIT_STEP=$step" \
        "$sbatch_script" "${train_args[@]}"
}

# Slurm itself requeues a job after a node failure, possibly onto a node we listed as faulty.
listed="$(listed_nodes)"
for node in "${nodes[@]}"; do
    if grep -qxF "$node" <<<"$listed"; then
        log "allocated node $node is on the faulty-node list $exclude_file"
        resubmit "faulty node $node in the allocation"
        exit 0
    fi
done

trapped=0
requeued=0
finished=0          # the step finished (exit 0) during the trap's grace
ended_status=""     # the step's status when the trap already waited for it
on_time_limit() {  # no command may end the script here (set -e): the job must requeue or resubmit
    trapped=1
    log "time limit near: the trainers checkpoint, then job $SLURM_JOB_ID requeues itself in ${grace_s}s"
    scancel --signal=USR1 "$SLURM_JOB_ID" || log "scancel --signal=USR1 failed: the trainers were not told to checkpoint"
    sleep "$grace_s"
    if [[ -n "${srun_pid:-}" ]] && ! kill -0 "$srun_pid" 2>/dev/null; then  # the step ended during the grace
        local step_status=0
        wait "$srun_pid" || step_status=$?
        if (( step_status == 0 )); then  # the trainers checkpoint and go on after USR1: exit 0 is a finished run
            log "the training step finished during the grace: no requeue"
            finished=1
            return 0
        fi
        ended_status="$step_status"
    fi
    if scontrol requeue "$SLURM_JOB_ID"; then
        requeued=1
    else
        log "scontrol requeue failed"
        resubmit "time limit, requeue failed" && requeued=1 || true
    fi
}
trap on_time_limit USR1

# torchrun SIGKILLs its workers a while after passing SIGTERM on: launch/env.sh asks for
# TORCH_ELASTIC_SHUTDOWN_TIMEOUT s, which torchrun reads only where it has --shutdown-timeout
shutdown_args=()
torchrun_help="$("$PYTHON" -m torch.distributed.run --help 2>/dev/null || true)"  # not piped: pipefail
if [[ "$torchrun_help" == *--shutdown-timeout* ]]; then
    shutdown_args=(--shutdown-timeout="$TORCH_ELASTIC_SHUTDOWN_TIMEOUT")
else
    log "this torchrun has no --shutdown-timeout: it SIGKILLs its workers 30 s after a SIGTERM, which must cover the exit checkpoint"
fi

job_started="$(date +%s)"
# One node: torchrun --standalone takes a free port, so jobs sharing the node never join each
# other's rendezvous store (c10d joins a store already on its port as a client).
if (( num_nodes == 1 )) && [[ -z "${KREA2_RDZV_PORT:-}" ]]; then
    rdzv_args=(--standalone)
    rendezvous="standalone"
else
    rdzv_args=(--rdzv-backend=c10d --rdzv-endpoint="$head_node:$rdzv_port" --rdzv-id="${SLURM_JOB_ID}")
    rendezvous="$head_node:$rdzv_port"
fi
log "run $run_name on ${#nodes[@]} node(s) x $gpus_per_node GPU(s), rendezvous $rendezvous, restart count ${SLURM_RESTART_COUNT:-0}"
# torchrun ignores USR1 (inherited by its workers as "ignored" until the trainer installs its
# handler): the time-limit signal reaches every process of the step and must not kill the launcher.
# srun does not inherit the job's --cpus-per-task since Slurm 22.05: pass it, or every worker of a
# node would share one CPU.
srun --nodes="$num_nodes" --ntasks-per-node=1 --kill-on-bad-exit=1 ${SLURM_CPUS_PER_TASK:+--cpus-per-task="$SLURM_CPUS_PER_TASK"} \
    bash -c 'trap "" USR1; exec "$@"' krea2-launcher \
    "$PYTHON" -m torch.distributed.run \
    --nnodes="$num_nodes" --nproc-per-node="$gpus_per_node" \
    "${rdzv_args[@]}" \
    --max-restarts="$max_restarts" ${shutdown_args[@]+"${shutdown_args[@]}"} \
    -m krea2_train "${train_args[@]}" run_name="$run_name" runs_root="$runs_root" &
srun_pid=$!

status=0
while true; do
    trapped=0
    wait "$srun_pid" && status=0 || status=$?
    if (( finished )); then status=0; break; fi
    if [[ -n "$ended_status" ]]; then status="$ended_status"; break; fi
    kill -0 "$srun_pid" 2>/dev/null && continue  # a trap interrupted the wait; the step runs on
    if (( trapped )); then  # it ended during the trap: the interrupted wait's status is not its own
        wait "$srun_pid" && status=0 || status=$?
    fi
    break
done

if (( requeued )); then
    log "training step ended (exit $status) after the time-limit requeue: the next job continues the run"
    exit 0
fi
if (( status == 0 )); then
    log "training step finished (exit 0)"
    exit 0
fi

# A SIGTERM that reached the step but not this script (scancel --signal=TERM without --full):
# the trainers checkpointed and stopped (torchrun still exits 1 after passing a signal on). It was
# asked for: nothing to check or resubmit.
signal_stop_since() {  # the step of the newest stop on a signal at or after $1 (epoch s), if any
    local runlog="$runs_root/$run_name/runlog.jsonl" line when step=""
    [[ -f "$runlog" ]] || return 0
    while IFS= read -r line; do
        when="$(sed -n 's/.*"time": \([0-9]*\).*/\1/p' <<<"$line")"
        if [[ -n "$when" ]] && (( when >= $1 )); then
            step="$(sed -n 's/.*"step": \([0-9]*\).*/\1/p' <<<"$line")"
        fi
    done < <(grep '"kind": "stop"' "$runlog" | grep -E '"reason": "(signal|interrupted)"' || true)
    echo "$step"
}
stopped_at="$(signal_stop_since "$job_started")"
if [[ -n "$stopped_at" ]]; then
    log "the trainers checkpointed and stopped on a signal at step $stopped_at (exit $status from torchrun): not resubmitting"
    exit 0
fi

user_error="$runs_root/$run_name/user_error.txt"
if [[ -f "$user_error" ]] && (( $(stat -c %Y "$user_error") >= job_started )); then
    log "training stopped on an error a restart would meet again, not resubmitting: $(tail -n 1 "$user_error")"
    exit "$status"
fi
log "training failed with exit status $status after torchrun's restarts; checking every node"
healthy="$(srun --nodes="$num_nodes" --ntasks-per-node=1 --kill-on-bad-exit=0 --time=5 \
    bash "$repo/launch/slurm/node_check.sh" "$gpus_per_node" 2>/dev/null | sed -n 's/^krea2-node-ok //p' || true)"
if [[ -z "$healthy" ]] && (( ${#nodes[@]} > 1 )); then
    log "no node of ${#nodes[@]} answered the check: the check itself failed, no node is listed"
else
    for node in "${nodes[@]}"; do
        if ! grep -qxF "$node" <<<"$healthy"; then
            log "node $node failed its check: added to $exclude_file"
            echo "$node" >>"$exclude_file"
        fi
    done
fi
resubmit "exit status $status" || exit "$status"
