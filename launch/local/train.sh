#!/usr/bin/env bash
# Train on one machine with automatic restarts.
#
#   launch/local/train.sh --config stage/pretrain_256 [key=value ...]
#
# torchrun starts KREA2_NPROC processes (default: one per visible GPU, else 1). When any of them
# fails (a crash, a SIGKILL, the hang watchdog's exit), torchrun stops the group and starts it
# again, up to KREA2_MAX_RESTARTS times (default 3); the trainer resumes from the run's newest
# checkpoint by itself. Exit status: 0 when training finished, otherwise torchrun's. A SIGTERM
# to this script reaches torchrun, which forwards it to the trainers (they checkpoint and leave
# within torchrun's shutdown timeout, 120 s from launch/env.sh) and then exits non-zero; the checkpoint is committed all the same.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=launch/env.sh
source "$here/../env.sh"

if [[ $# -eq 0 ]]; then
    echo "usage: $0 --config stage/NAME|my_stage.yaml [key=value ...]" >&2
    exit 2
fi

nproc="${KREA2_NPROC:-}"
if [[ -z "$nproc" ]]; then
    nproc="$("$PYTHON" -c 'import torch; print(max(torch.cuda.device_count(), 1))')"
fi
max_restarts="${KREA2_MAX_RESTARTS:-3}"

echo "krea2: $nproc process(es), up to $max_restarts restart(s): $*"
exec "$PYTHON" -m torch.distributed.run \
    --standalone --nnodes=1 --nproc-per-node="$nproc" \
    --max-restarts="$max_restarts" \
    -m krea2_train "$@"
