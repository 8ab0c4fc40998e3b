#!/usr/bin/env bash
# A node's health check after a failed job: prints "krea2-node-ok HOST" when the node can train.
#
#   node_check.sh EXPECTED_GPUS
#
# Checks: Python imports torch; with EXPECTED_GPUS > 0 and nvidia-smi present, that many GPUs
# answer nvidia-smi and torch sees them and can run a small matmul on each. Silent on failure
# (the caller treats a node that did not print the line as faulty).
set -euo pipefail

expected_gpus="${1:-0}"
if command -v nvidia-smi >/dev/null && (( expected_gpus > 0 )); then
    visible="$(nvidia-smi --query-gpu=index --format=csv,noheader | wc -l)"
    (( visible >= expected_gpus )) || exit 1
fi
"${PYTHON:-python}" - "$expected_gpus" <<'PY' || exit 1
import sys
import torch

expected = int(sys.argv[1])
if torch.cuda.is_available() and expected > 0:
    assert torch.cuda.device_count() >= expected, f"{torch.cuda.device_count()} GPUs visible, {expected} expected"
    for index in range(expected):
        x = torch.randn(256, 256, device=f"cuda:{index}")
        torch.cuda.synchronize(index)
        assert torch.isfinite(x @ x).all()
PY
echo "krea2-node-ok ${SLURMD_NODENAME:-$(hostname)}"  # the name Slurm lists the node under
