#!/usr/bin/env bash
# Download (or build) the wheels of infra/gpu/wheels.txt into .whl/ at the repository root, for
# the GPU machine's Python 3.12 on x86-64. .whl/ is git-ignored: name it in the run tool's
# `carry`, and let infra/gpu/checks.sh install it there (see docs/benchmarks.md).
set -euo pipefail
cd "$(dirname "$0")/../.."
python=${PYTHON:-python3}
mkdir -p .whl
wheels=() built=()
while read -r line; do
    spec=${line%%#*}
    spec=${spec//[[:space:]]/}
    [[ -z "$spec" ]] && continue
    if [[ "$line" == *"# build"* ]]; then built+=("$spec"); else wheels+=("$spec"); fi
done < infra/gpu/wheels.txt
platforms=()
for tag in manylinux_2_34_x86_64 manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 \
           manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$tag")
done
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl "${wheels[@]}"
if ((${#built[@]})); then
    "$python" -m pip wheel -q --no-deps -w .whl "${built[@]}"
fi
count=$(find .whl -name '*.whl' | wc -l)
echo "$count wheels in .whl ($(du -sh .whl | cut -f1)); carry [\".whl\"] and run infra/gpu/checks.sh there"
