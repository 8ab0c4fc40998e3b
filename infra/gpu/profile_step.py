"""Profile training steps of ours and the diffusers reference, as ``krea2 bench train`` runs them.

    python infra/gpu/profile_step.py --out $OUT/profile -- --res 512 --batch 4 --compile
    python infra/gpu/profile_step.py --out /tmp/profile -- --device cpu --preset tiny --res 64 --steps 1 --warmup 0

Arguments after ``--`` are ``krea2 bench train``'s. For each model: warm-up steps, then three
profiled steps; writes ``<model>_kernels.txt`` (the top 30 ops by device time, or CPU time on
CPU) and ``<model>_trace.json`` (a Chrome trace) into ``--out``.
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from krea2_train.bench import train as bench
from krea2_train.bench.gpu import synchronize
from krea2_train.model import model_config
from krea2_train.parallel.attention import attention_backends
from krea2_train.parallel.distributed import destroy_distributed, init_distributed

PROFILED_STEPS = 3


def main(argv: list[str]) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    own, bench_argv = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    args = parser.parse_args(own)
    bench_parser = argparse.ArgumentParser()
    bench.add_arguments(bench_parser)
    settings = bench.resolve_settings(bench_parser.parse_args(bench_argv))
    args.out.mkdir(parents=True, exist_ok=True)
    on_cuda = settings.device.type == "cuda"
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if on_cuda else [])]
    sort_by = "self_device_time_total" if on_cuda else "self_cpu_time_total"
    builders = [("ours", bench.build_ours)] + ([("diffusers", bench.build_reference)] if settings.reference == "diffusers" else [])
    written = []
    init_distributed()
    try:
        for name, build in builders:
            inputs = bench.make_inputs(model_config(settings.preset), settings, settings.text_tokens(name))
            with attention_backends(settings.sdpa if name == "ours" else None):
                trainee = build(settings)
                for _ in range(max(settings.warmup, 1)):
                    bench.train_step(trainee, inputs, bench.PhaseClock(settings.device))
                synchronize(settings.device)
                with profile(activities=activities) as profiler:
                    for _ in range(PROFILED_STEPS):
                        bench.train_step(trainee, inputs, bench.PhaseClock(settings.device))
                    synchronize(settings.device)
            table = profiler.key_averages().table(sort_by=sort_by, row_limit=30)
            (args.out / f"{name}_kernels.txt").write_text(f"{settings.describe()}\n{PROFILED_STEPS} steps\n{table}\n")
            profiler.export_chrome_trace(str(args.out / f"{name}_trace.json"))
            written += [args.out / f"{name}_kernels.txt", args.out / f"{name}_trace.json"]
            print(f"{name}:\n{table}")
            del trainee
            gc.collect()
            if on_cuda:
                torch.cuda.empty_cache()
    finally:
        destroy_distributed()
    return written


if __name__ == "__main__":
    main(sys.argv[1:])
