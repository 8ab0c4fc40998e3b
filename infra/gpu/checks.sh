#!/usr/bin/env bash
# The GPU checks that the CPU machines cannot make (issue 7 and the float8 checks), in parts that
# each fit one 10-minute command of the lent GPU machine. Run from the repository root there,
# with the wheels of infra/gpu/fetch_wheels.sh carried in .whl/:
#
#   bash infra/gpu/checks.sh env kernels bench-targets     # ~9 min: versions, kernels, the three targets
#   bash infra/gpu/checks.sh owed                          # ~6 min: fp8 at 512 and 1024 px, eager, 256 px vs diffusers
#   bash infra/gpu/checks.sh bench-more                    # ~2.5 min: equal work, SDPA lists, 512 px
#   bash infra/gpu/checks.sh fp8-256                       # ~6 min: fp8 vs bf16 loss curves at 256 px
#   bash infra/gpu/checks.sh profile bench-memory          # ~4.5 min: profile, AC policies
#   bash infra/gpu/checks.sh fp8-speed                     # ~4 min: fp8 step time on small and at 512 px
#   bash infra/gpu/checks.sh fp8-512                       # ~8 min: rowwise fp8 loss curves at 512 px
#   bash infra/gpu/checks.sh post-training                 # ~8 min: pretrain -> stpo -> grpo -> tdm in bf16
#   bash infra/gpu/checks.sh curation                      # ~5 min: k-means runs, searches and semantic dedup in torch on the GPU
#   bash infra/gpu/checks.sh lora-12b                      # ~4 min: LoRA on the 12.9B model, step time and peak memory
#   bash infra/gpu/checks.sh checkpoint lora-run           # ~6 min: a 1.1B checkpoint from GPU memory; LoRA runs, bf16 and float8 base
#   bash infra/gpu/checks.sh compile-cache                 # ~4 min: a restart's first step with and without the run's compile cache
#
# Everything lands under $OUT/<part>/ (JSON and logs); then, on any machine,
# `python infra/gpu/summarize.py DIR` prints the markdown tables for docs/benchmarks.md.
# A failing command is logged and the part goes on, so one failure costs no other result.
# The whole call keeps within KREA2_GPU_BUDGET_S seconds (default 540: the device allows 600 a
# command, and the archives must still be written): a command gets at most what is left less a
# margin, and one that cannot start in time is recorded as skipped, so parts that do not fit
# one call leave their results instead of being killed before the archive.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

if [[ -d .whl ]] && ! python3 -c "import torchtitan, diffusers, hydra, psycopg" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

BUDGET_S=${KREA2_GPU_BUDGET_S:-540}
MARGIN_S=20  # for the archive after the command

# run NAME TIMEOUT_S COMMAND...: log to $OUT/$part/NAME.log, record the exit status, go on
run() {
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET_S - SECONDS - MARGIN_S))
    if ((left < 30)); then
        echo "$name skipped-out-of-time 0s" | tee -a "$OUT/$part/status.txt"
        return
    fi
    ((limit > left)) && limit=$left
    echo "== $part/$name (at most ${limit}s): $*"
    local start=$SECONDS
    timeout "$limit" "$@" >"$OUT/$part/$name.log" 2>&1
    local status=$?
    echo "$name $status $((SECONDS - start))s" | tee -a "$OUT/$part/status.txt"
    tail -n 5 "$OUT/$part/$name.log"
}

bench() {  # bench NAME ARGS...: krea2 bench train, rows in $OUT/$part/NAME.json
    local name=$1
    shift
    run "$name" 420 python3 -m krea2_train.cli bench train --json "$OUT/$part/$name.json" "$@"
}

# `small` with its text path narrowed to the tiny CPU text encoder's 64-wide, 4-tap output
SMALL=(model=small +model.overrides.text_hidden_dim=64 +model.overrides.num_text_layers=4
       +model.overrides.text_num_attention_heads=4 +model.overrides.text_num_key_value_heads=2
       +model.overrides.text_intermediate_size=128)
COMMON=(logging.wandb=disabled data.num_samples=2048 data.num_workers=4 checkpoint.interval=100000
        logging.sample_steps=4 parallel.mixed_precision=bf16 parallel.deterministic=false parallel.compile=true)

fp8_curves() {  # fp8_curves STAGE STEPS BATCH FP8_RUN: bf16, fp8 and bf16 at another seed
    local stage=$1 steps=$2 batch=$3 fp8_run=$4 res=${1#pretrain_} name precision seed
    for spec in "bf16_$res float8.enabled=false seed=0" "$fp8_run float8.allow_fallback=false seed=0" \
                "bf16_${res}_seed1 float8.enabled=false seed=1"; do
        read -r name precision seed <<<"$spec"
        run "$name" 300 python3 -m krea2_train --config "stage/$stage" "${SMALL[@]}" "${COMMON[@]}" \
            "runs_root=$OUT/$part/runs" stage.init_from=null "run_name=$name" "$precision" "$seed" \
            "stage.steps=$steps" "data.global_batch_size=$batch"
    done
}

for part in "$@"; do
    mkdir -p "$OUT/$part"
    case $part in
    env)
        run nvidia-smi 30 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
        run versions 120 python3 - <<'EOF'
import importlib, torch
from krea2_train.parallel.float8 import float8_unavailable_reason
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
print("device", torch.cuda.get_device_name(), torch.cuda.get_device_capability())
for name in ("torchtitan", "torchao", "diffusers", "transformers", "hydra", "psycopg"):
    module = importlib.import_module(name)
    print(name, getattr(module, "__version__", "?"))
print("float8 unavailable reason:", float8_unavailable_reason(torch.device("cuda")))
EOF
        ;;
    kernels)
        run kernels 300 python3 infra/gpu/kernels.py --json "$OUT/$part/kernels.json"
        ;;
    bench-targets)  # 1.5x diffusers and MFU >= 0.5 at 1024 px bf16 (batch 1 and 2); fp8 >= 1.15x bf16 at 256 px (batch 8 and 32)
        bench 1024_b1_compile --res 1024 --batch 1 --compile
        bench 1024_b2_compile --res 1024 --batch 2 --compile --reference none
        bench 256_b8_compile_bf16 --res 256 --batch 8 --compile --reference none
        bench 256_b8_compile_fp8tw --res 256 --batch 8 --compile --reference none --fp8 --fp8-recipe tensorwise
        # batch 32: the fixed AdamW step (~37 ms) is a quarter of a batch-8 step and dilutes any
        # fp8 gain; 256 px pretraining runs larger per-GPU batches than that
        bench 256_b32_compile_bf16 --res 256 --batch 32 --compile --reference none
        bench 256_b32_compile_fp8tw --res 256 --batch 32 --compile --reference none --fp8 --fp8-recipe tensorwise
        ;;
    owed)  # what the 2026-11-23 session's device time left unmeasured (docs/benchmarks.md)
        bench 256_b8_compile --res 256 --batch 8 --compile
        bench 1024_b1_compile_fp8tw --res 1024 --batch 1 --compile --reference none --fp8 --fp8-recipe tensorwise
        bench 1024_b1_compile_fp8rw --res 1024 --batch 1 --compile --reference none --fp8 --fp8-recipe rowwise
        bench 512_b4_compile_fp8tw --res 512 --batch 4 --compile --reference none --fp8 --fp8-recipe tensorwise
        bench 1024_b1_eager --res 1024 --batch 1
        bench 256_b8_eager --res 256 --batch 8
        ;;
    bench-more)
        bench 1024_b1_compile_equal_work --res 1024 --batch 1 --compile --text padded
        bench 1024_b1_compile_cudnn --res 1024 --batch 1 --compile --reference none --sdpa cudnn,math
        bench 1024_b1_compile_efficient --res 1024 --batch 1 --compile --reference none --sdpa efficient,math
        bench 512_b4_compile --res 512 --batch 4 --compile
        ;;
    bench-memory)
        bench 1024_b2_compile --res 1024 --batch 2 --compile
        bench 1024_b2_sac --res 1024 --batch 2 --ac selective --compile --reference none
        bench 1024_b2_fullac --res 1024 --batch 2 --ac full --compile --reference none
        bench 512_b4_eager --res 512 --batch 4
        ;;
    fp8-speed)  # fp8 over bf16 on `small` (1536 wide) and at 512 px rowwise on full-width blocks
        bench small_256_b64_bf16 --preset small --res 256 --batch 64 --compile --reference none
        bench small_256_b64_fp8tw --preset small --res 256 --batch 64 --compile --reference none --fp8 --fp8-recipe tensorwise
        bench small_512_b16_bf16 --preset small --res 512 --batch 16 --compile --reference none
        bench small_512_b16_fp8rw --preset small --res 512 --batch 16 --compile --reference none --fp8 --fp8-recipe rowwise
        bench 512_b4_compile_bf16 --res 512 --batch 4 --compile --reference none
        bench 512_b4_compile_fp8rw --res 512 --batch 4 --compile --reference none --fp8 --fp8-recipe rowwise
        ;;
    profile)  # top kernels and Chrome traces of ours and the reference, 512 px
        run profile 420 python3 infra/gpu/profile_step.py --out "$OUT/$part" -- --res 512 --batch 4 --compile
        ;;
    fp8-256)
        fp8_curves pretrain_256 300 32 fp8tw_256
        ;;
    fp8-512)
        fp8_curves pretrain_512 150 16 fp8rw_512
        ;;
    post-training)  # the post-training stages in bf16 on CUDA: STPO starts at ln 2, GRPO's first ratio is 1,
        # TDM's third step logs "host syncs in one training step: 1" (its phases skip on the device);
        # the pretrain runs iREPA in compiled, selectively checkpointed blocks (parallel=cluster's setting)
        POST=("${SMALL[@]}" "${COMMON[@]}" "runs_root=$OUT/$part/runs" data.num_samples=512 data.resolution=256)
        run pretrain 300 python3 -m krea2_train --config stage/pretrain_256 "${POST[@]}" stage.init_from=null \
            parallel.activation_checkpoint=selective stage.steps=60 data.global_batch_size=16 optim.lr=3e-4
        run stpo 240 python3 -m krea2_train --config stage/stpo "${POST[@]}" stage.init_from=pretrain_256 \
            stage.steps=10 data.global_batch_size=8 stpo.beta=50
        run grpo 240 python3 -m krea2_train --config stage/grpo "${POST[@]}" stage.init_from=stpo \
            stage.steps=6 data.global_batch_size=16 grpo.group_size=8
        run tdm 240 python3 -m krea2_train --config stage/tdm "${POST[@]}" stage.init_from=grpo \
            stage.steps=10 data.global_batch_size=8
        ;;
    lora-12b)  # LoRA rank 64 on the 12.9B model (bf16 base, frozen) at 1024 px: step time and peak memory, without and with AC
        bench lora12b_1024_b1 --preset krea2_medium --res 1024 --batch 1 --lora 64 --compile --warmup 3 --steps 10
        bench lora12b_1024_b1_fullac --preset krea2_medium --res 1024 --batch 1 --lora 64 --ac full --compile --warmup 3 --steps 10
        ;;
    curation)  # balanced selection at 1M x 768: torch k-means runs and searches, semantic dedup (no faiss on this machine);
        # its table is in data_balance.log (summarize.py reads the train benches' JSON only)
        run data_balance 420 python3 -m krea2_train.bench.data_balance --images 1000000
        ;;
    checkpoint)  # a save of the real text path and one full-width block (1.1B, 13 GB with AdamW) from GPU memory:
        # the time it blocks training (the copy to pinned host memory) against its write; bytes per
        # parameter extrapolate to the 12.9B model against resilience.checkpoint_timeout_s
        run ckpt_full_width 420 python3 -m krea2_train.cli bench ckpt --ckpt-model full_width --ckpt-device cuda \
            --ckpt-saves 3 --ckpt-dir "$OUT/$part/ckpt" --json "$OUT/$part/ckpt_full_width.json"
        ;;
    lora-run)  # LoRA stage runs on CUDA from a short pretrain: the base frozen in bf16 (base_dtype auto under
        # bf16 mixed precision) and in float8; loss finite, the exported LoRA loads back
        LORA=("${SMALL[@]}" "${COMMON[@]}" "runs_root=$OUT/$part/runs" data.num_samples=512 data.resolution=256)
        run pretrain 240 python3 -m krea2_train --config stage/pretrain_256 "${LORA[@]}" stage.init_from=null \
            stage.steps=20 data.global_batch_size=16
        for base in bf16 float8; do
            run "lora_$base" 200 python3 -m krea2_train --config stage/lora "${LORA[@]}" stage.init_from=pretrain_256 \
                "run_name=lora_$base" "lora.base_dtype=$base" stage.steps=30 data.global_batch_size=8
        done
        run lora_export 120 python3 -m krea2_train.cli lora export lora_bf16 --runs-root "$OUT/$part/runs" \
            --out "$OUT/$part/lora_bf16.safetensors"
        ;;
    compile-cache)  # compiled `small` at 256 px: a first start on an empty Inductor cache, then restarts on an
        # empty one (another node) with the run's compile_cache.bin and without it; the first step of each is the measure
        CC=("${SMALL[@]}" "${COMMON[@]}" "runs_root=$OUT/$part/runs" data.num_samples=512 data.resolution=256
            stage.init_from=null data.global_batch_size=16 checkpoint.interval=3)
        TORCHINDUCTOR_CACHE_DIR="$OUT/$part/inductor-a" run first 240 python3 -m krea2_train --config stage/pretrain_256 "${CC[@]}" stage.steps=3
        TORCHINDUCTOR_CACHE_DIR="$OUT/$part/inductor-b" run restart_with_cache 200 python3 -m krea2_train --config stage/pretrain_256 "${CC[@]}" stage.steps=6
        TORCHINDUCTOR_CACHE_DIR="$OUT/$part/inductor-c" run restart_without_cache 200 python3 -m krea2_train --config stage/pretrain_256 "${CC[@]}" stage.steps=9 parallel.compile_cache=false
        rm -rf "$OUT/$part"/inductor-?
        ;;
    *)
        echo "unknown part '$part': env kernels bench-targets owed bench-more bench-memory fp8-speed profile fp8-256 fp8-512 post-training curation lora-12b checkpoint lora-run compile-cache" >&2
        exit 2
        ;;
    esac
    # the run tool brings back at most 8 files of 16 MiB: one archive per part, without the runs'
    # checkpoints, database, datasets and encoders (summarize.py reads the archives)
    tar -czf "$OUT/$part.tar.gz" --exclude=checkpoints --exclude=_store --exclude=_datasets --exclude=_shards \
        --exclude=text_encoder --exclude=irepa_encoder -C "$OUT" "$part" && rm -rf "${OUT:?}/$part"
done
