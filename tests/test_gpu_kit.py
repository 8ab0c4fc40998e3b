"""infra/gpu: the GPU checks' kernel timer runs (on CPU, tiny shapes) and the summary turns their
outputs into the right verdicts."""

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from krea2_train.bench import train as bench_train

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "infra" / "gpu"))
import summarize  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def _bench_rows(*extra):
    import argparse

    parser = argparse.ArgumentParser()
    bench_train.add_arguments(parser)
    args = parser.parse_args(["--device", "cpu", "--preset", "tiny", "--res", "64", "--batch", "2", "--text-len", "80",
                              "--caption-tokens", "9", "--warmup", "0", "--steps", "1", *extra])
    return bench_train.run(args)


def _as_gpu(rows, setup_edits, values):
    """A CPU bench's rows relabelled as a GPU setting (the summary reads setup and values only)."""
    edited = []
    for row in rows:
        row = dict(row)
        if row["metric"] == "setup":
            for key, value in setup_edits.items():
                row["value"] = " ".join(f"{key}={value}" if part.startswith(f"{key}=") else part for part in row["value"].split())
        if row["metric"] in values:
            row["value"] = values[row["metric"]]
        edited.append(row)
    return edited


def _metrics(path, losses, skipped=0):
    path.mkdir(parents=True)
    lines = [{"step": i + 1, "loss": loss, "loss_fm": loss, "step_time_s": 0.5, "skipped_total": skipped} for i, loss in enumerate(losses)]
    (path / "metrics.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")


def test_summary_reports_the_targets_fp8_pairs_kernels_and_curves(tmp_path):
    rows = _bench_rows("--reference", "diffusers")
    gpu = {"dtype": "bf16", "res": "1024"}
    bench = tmp_path / "bench-targets"
    bench.mkdir()
    target_rows = _as_gpu(rows, gpu, {"speedup_ours_vs_diffusers": 1.62, "ours_mfu_vs_measured_matmul": 0.41})
    (bench / "1024.json").write_text(json.dumps(target_rows))
    bf16 = _as_gpu(rows, {"res": "256", "dtype": "bf16"}, {"ours_images_per_s": 100.0})
    fp8 = _as_gpu(rows, {"res": "256", "dtype": "bf16", "fp8": "tensorwise"}, {"ours_images_per_s": 112.0})
    (bench / "256_bf16.json").write_text(json.dumps(bf16))
    (bench / "256_fp8.json").write_text(json.dumps(fp8))
    (bench / "not_a_bench.json").write_text(json.dumps({"rows": []}))

    kernels = tmp_path / "kernels"
    kernels.mkdir()
    subprocess.run([sys.executable, str(REPO / "infra/gpu/kernels.py"), "--small", "--device", "cpu", "--min-run-time", "0.01",
                    "--json", str(kernels / "kernels.json")], check=True, capture_output=True, cwd=REPO)

    runs = tmp_path / "fp8-256" / "runs"
    _metrics(runs / "bf16_256", [1.0] * 20)
    _metrics(runs / "bf16_256_seed1", [1.004] * 20)  # seed gap 0.4%: tolerance 2%
    _metrics(runs / "fp8tw_256", [1.0] * 10 + [1.03] * 10)  # second half 3% above: FAIL
    runs = tmp_path / "fp8-512" / "runs"
    _metrics(runs / "bf16_512", [1.0] * 20)
    _metrics(runs / "bf16_512_seed1", [1.02] * 20)  # seed gap 2%: tolerance 4%
    _metrics(runs / "fp8rw_512", [1.03] * 20)  # 3%: PASS
    with tarfile.open(tmp_path / "fp8-512.tar.gz", "w:gz") as tar:  # as checks.sh leaves each part
        tar.add(tmp_path / "fp8-512", arcname="fp8-512")
    shutil.rmtree(tmp_path / "fp8-512")

    text = summarize.summarize(tmp_path)
    assert "ours / diffusers at 1024 px bf16 (bench-targets/1024.json): 1.62x, target >= 1.5x: met" in text
    assert "MFU at 1024 px bf16 (bench-targets/1024.json): 0.41 of the measured matmul rate, target >= 0.5: NOT met" in text
    assert "fp8 / bf16 (bench-targets/256_fp8.json over bench-targets/256_bf16.json): 1.12x, target >= 1.15x: NOT met" in text
    assert text.count("| bench-targets/") == 3  # one table row per bench JSON, the other JSON ignored
    assert "| attention | FLASH_ATTENTION, text 128 real of 512 |" in text and "one GEMM, fused weight" in text
    assert "| block | float32 (288 tokens) |" in text and "| block | tensorwise (288 tokens) | unavailable |" in text
    assert "fp8tw_256 vs bf16_256 over 20 steps: second-half loss gap 3.00%" in text and "tolerance 2.00%): FAIL" in text
    assert "worst 10-step window 3.00%" in text
    assert "fp8rw_512 vs bf16_512 over 20 steps" in text and "tolerance 4.00%): PASS" in text


def test_float8_block_rows_read_as_ratios_to_the_unconverted_block(tmp_path):
    rows = [
        {"kernel": "block", "case": "bfloat16", "tokens": 3072, "compiled": True, "ms": 10.0},
        {"kernel": "block", "case": "tensorwise", "tokens": 3072, "compiled": True, "ms": 8.0},
        {"kernel": "block", "case": "rowwise", "tokens": 3072, "compiled": True, "ms": 12.5},
        {"kernel": "block", "case": "bfloat16", "tokens": 4224, "compiled": True, "ms": 20.0},
        {"kernel": "block", "case": "tensorwise", "tokens": 4224, "compiled": True, "unavailable": "no"},
    ]
    path = tmp_path / "kernels.json"
    path.write_text(json.dumps({"device": "H100", "rows": rows}))
    table = summarize.kernels_table(path)
    assert "| block | tensorwise (3072 tokens): 1.25x the unconverted block | 8 |" in table
    assert "| block | rowwise (3072 tokens): 0.80x the unconverted block | 12.5 |" in table
    assert "| block | tensorwise (4224 tokens) | unavailable |" in table


def test_post_training_checks_fail_when_the_reference_or_the_first_ratio_is_off(tmp_path):
    runs = tmp_path / "post-training" / "runs"

    def write(stage, records):
        (runs / stage).mkdir(parents=True)
        common = {"loss": 0.5, "step_time_s": 1.0, "memory_gib": 2.0, "skipped_total": 0}
        (runs / stage / "metrics.jsonl").write_text("".join(json.dumps({**common, "step": i + 1, **r}) + "\n" for i, r in enumerate(records)))

    write("stpo", [{"loss_dpo": 0.693}, {"loss_dpo": 0.69}])  # 1.5e-4 from ln 2: PASS
    write("grpo", [{"update_index": 0, "ratio_mean": 1.0, "logp_rollout_gap_max": 1e-3},
                   {"update_index": 1, "ratio_mean": 0.99, "logp_rollout_gap_max": 0.0},
                   {"update_index": 0, "ratio_mean": 1.001, "logp_rollout_gap_max": 0.0}])  # a later rollout is off: FAIL
    text = summarize.summarize(tmp_path)
    assert "| stpo | 2 | yes | 1 | 2 | step-1 loss_dpo - ln 2 = 1.5e-04 (PASS) |" in text
    assert "first-update |ratio - 1| <= 1.0e-03 (FAIL); sampling vs recomputed log p gap 1.0e-03" in text
    assert "| tdm |" not in text  # no run, no row


def test_fp8_run_with_skipped_steps_fails_whatever_its_loss():
    verdict = summarize.fp8_curve_verdict([1.0] * 10, [1.0] * 10, [1.0] * 10, fp8_healthy=False)
    assert verdict["gap_fp8"] == 0 and not verdict["passed"]


def test_profile_writes_kernel_tables_and_traces_of_both_models(tmp_path):
    subprocess.run([sys.executable, str(REPO / "infra/gpu/profile_step.py"), "--out", str(tmp_path), "--", "--device", "cpu",
                    "--preset", "tiny", "--res", "64", "--batch", "2", "--text-len", "80", "--caption-tokens", "9",
                    "--steps", "1", "--warmup", "0"], check=True, capture_output=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    for name in ("ours", "diffusers"):
        table = (tmp_path / f"{name}_kernels.txt").read_text()
        assert "aten::mm" in table and "ours_text=compact" in table
        assert json.loads((tmp_path / f"{name}_trace.json").read_text())["traceEvents"]


def test_checks_keep_within_the_device_calls_time_budget(tmp_path):
    """A command that cannot finish within the budget is skipped and recorded, and the part is
    still archived (a call killed at the device's limit would bring nothing back)."""
    env = dict(os.environ, OUT=str(tmp_path), KREA2_GPU_BUDGET_S="30",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")  # python3: this environment's
    completed = subprocess.run(["bash", str(REPO / "infra" / "gpu" / "checks.sh"), "kernels"], env=env, capture_output=True,
                               text=True, timeout=60)
    assert completed.returncode == 0, completed.stderr
    with tarfile.open(tmp_path / "kernels.tar.gz") as tar:
        status = tar.extractfile("kernels/status.txt").read().decode()
    assert status.startswith("kernels skipped-out-of-time")
