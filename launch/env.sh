# shellcheck shell=bash
# Environment shared by the launchers (sourced). Every value can be set beforehand.
#
# The NCCL flight recorder keeps the last collectives of each rank so that a hang can be read
# after the fact: the watchdog dumps it next to the Python stacks (run_dir/hangs/), and NCCL dumps
# it by itself when a collective times out.
export TORCH_NCCL_TRACE_BUFFER_SIZE="${TORCH_NCCL_TRACE_BUFFER_SIZE:-2000}"
export TORCH_NCCL_DUMP_ON_TIMEOUT="${TORCH_NCCL_DUMP_ON_TIMEOUT:-1}"
# A collective error or timeout tears the process down instead of leaving it hanging.
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-3}"
# Each restart of a torchrun group gets a fresh rendezvous store: with the agent's shared store,
# the restarted workers read their peers' addresses from the previous attempt and never connect.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE="${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}"
# torchrun SIGKILLs its workers this many seconds after passing SIGTERM on (30 by default): the
# trainers need one step plus the exit checkpoint (and a periodic save still in flight) within
# it. Keep the cluster's KillWait and preemption GraceTime above it (docs/operations.md).
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-${KREA2_SHUTDOWN_TIMEOUT_S:-120}}"
export PYTHONUNBUFFERED=1
export PYTHON="${PYTHON:-python}"
