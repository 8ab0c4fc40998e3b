"""Kernel choices of the DiT's step, timed on the device: which SDPA backend runs our masked GQA
attention fastest, and whether fusing the q/k/v/gate projections into one GEMM would pay.

    python infra/gpu/kernels.py --json $OUT/kernels.json            # full-width shapes, CUDA bf16
    python infra/gpu/kernels.py --small --device cpu                 # the same code on tiny shapes

Attention: ``grouped_query_attention`` (query groups folded into the sequence, no repeated KV
heads) forward + backward at the 512 px joint sequence, 48/12 heads of 128, under each SDPA
backend alone, with 128 real of 512 text tokens (the padded layout the diffusers reference runs)
and 128 of 128 (the trainer's compacted text, still with its mask).

Projections: forward + backward of the four projections of one block (q 6144, k 1536, v 1536,
gate 6144 outputs) as four GEMMs, as one GEMM on a prebuilt fused weight (a fused parameter),
and as one GEMM on weights concatenated every step (a runtime fusion of diffusers-keyed weights).

Block: forward + backward of one full-width ``Krea2Block`` (compiled on CUDA) at 256 px batch 8
and 1024 px batch 1 with 128 text tokens, in the compute dtype and with its eight projections in
float8 (torchao tensorwise, rowwise). Blocks are 89% of the 12.9B model's FLOPs at 256 px (text
fusion most of the rest), but only 55% of ``bench_full_width``'s, whose step also carries the
whole AdamW update: this is float8's gain on what the real model is made of.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.benchmark import Timer

from krea2_train.model.dit import DEFAULT_CONFIG, grouped_query_attention

FULL = dict(batch=4, image_tokens=1024, heads=48, kv_heads=12, head_dim=128, width=6144,
            mlp=DEFAULT_CONFIG["intermediate_size"], rope=DEFAULT_CONFIG["axes_dims_rope"],
            blocks=((8, 16), (1, 64)))  # blocks: (batch, image grid side) = 256, 1024 px
SMALL = dict(batch=2, image_tokens=64, heads=4, kv_heads=2, head_dim=16, width=64, mlp=128, rope=(4, 6, 6),
             blocks=((2, 4),))
BLOCK_TEXT_TOKENS = 128


def median_ms(stmt: str, scope: dict, min_run_time: float) -> float:
    return Timer(stmt, globals=scope).blocked_autorange(min_run_time=min_run_time).median * 1e3


def time_attention(shape: dict, device: torch.device, dtype: torch.dtype, min_run_time: float) -> list[dict]:
    rows = []
    for text_tokens, real in ((512, 128), (128, 128)):
        seq = text_tokens + shape["image_tokens"]
        make = lambda heads: torch.randn(shape["batch"], seq, heads, shape["head_dim"], device=device, dtype=dtype).requires_grad_()  # noqa: E731
        q, k, v = make(shape["heads"]), make(shape["kv_heads"]), make(shape["kv_heads"])
        mask = torch.ones(shape["batch"], seq, dtype=torch.bool, device=device)
        mask[:, real:text_tokens] = False
        for backend in ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH"):
            row = {"kernel": "attention", "backend": backend, "text_tokens": text_tokens, "real_text_tokens": real}
            try:
                with sdpa_kernel([getattr(SDPBackend, backend)]):
                    scope = {"attention": grouped_query_attention, "q": q, "k": k, "v": v, "mask": mask}
                    row["ms"] = median_ms("attention(q, k, v, mask).sum().backward()", scope, min_run_time)
            except RuntimeError as error:
                row["unavailable"] = str(error).splitlines()[0][:200]
            rows.append(row)
    return rows


def time_projections(shape: dict, device: torch.device, dtype: torch.dtype, min_run_time: float) -> list[dict]:
    width, kv_width = shape["width"], shape["kv_heads"] * shape["head_dim"]
    tokens = shape["batch"] * (shape["image_tokens"] + 128)
    x = torch.randn(tokens, width, device=device, dtype=dtype).requires_grad_()
    weights = [(torch.randn(n, width, device=device, dtype=dtype) * 0.02).requires_grad_() for n in (width, kv_width, kv_width, width)]
    fused = torch.cat(weights).detach().requires_grad_()
    scope = {"F": F, "torch": torch, "x": x, "weights": weights, "fused": fused}
    cases = {
        "four GEMMs": "sum(F.linear(x, w).sum() for w in weights).backward()",
        "one GEMM, fused weight": "F.linear(x, fused).sum().backward()",
        "one GEMM, weights concatenated": "F.linear(x, torch.cat(weights)).sum().backward()",
    }
    return [{"kernel": "projections", "case": name, "tokens": tokens, "ms": median_ms(stmt, scope, min_run_time)} for name, stmt in cases.items()]


def time_block_float8(shape: dict, device: torch.device, dtype: torch.dtype, min_run_time: float) -> list[dict]:
    from torch import nn

    from krea2_train.config.schema import Float8Config
    from krea2_train.model.dit import Krea2Block, rotary_cos_sin
    from krea2_train.model.patchify import position_ids
    from krea2_train.parallel.float8 import FLOAT8_RECIPES, convert_to_float8, float8_unavailable_reason

    compiled = device.type == "cuda"  # inductor's CPU build takes minutes: eager there
    rows = []
    for batch, side in shape["blocks"]:
        seq = BLOCK_TEXT_TOKENS + side * side
        cos, sin = rotary_cos_sin(position_ids(BLOCK_TEXT_TOKENS, side, side, device=device), shape["rope"], DEFAULT_CONFIG["rope_theta"])
        x = torch.randn(batch, seq, shape["width"], device=device, dtype=dtype).requires_grad_()
        modulation = 0.1 * torch.randn(batch, 1, 6 * shape["width"], device=device, dtype=dtype)
        mask = torch.ones(batch, seq, dtype=torch.bool, device=device)
        grad = torch.randn_like(x)
        for recipe in (None, *FLOAT8_RECIPES):
            row = {"kernel": "block", "case": recipe or str(dtype).removeprefix("torch."), "tokens": batch * seq,
                   "compiled": compiled}
            reason = float8_unavailable_reason(device) if recipe else None
            if reason:
                row["unavailable"] = reason
                rows.append(row)
                continue
            torch.manual_seed(0)
            holder = nn.Module()  # the block at the path the float8 filters expect
            holder.transformer_blocks = nn.ModuleList(
                [Krea2Block(shape["width"], shape["mlp"], shape["heads"], shape["kv_heads"], DEFAULT_CONFIG["norm_eps"])]
            )
            holder.to(device=device, dtype=dtype)
            if recipe:
                convert_to_float8(holder, Float8Config(enabled=True, recipe=recipe))
            block = holder.transformer_blocks[0]
            run = torch.compile(block) if compiled else block
            scope = {"run": run, "x": x, "modulation": modulation, "cos": cos, "sin": sin, "mask": mask, "grad": grad}
            row["ms"] = median_ms("run(x, modulation, cos, sin, mask).backward(grad)", scope, min_run_time)
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="tiny shapes (a check that the script runs)")
    parser.add_argument("--min-run-time", type=float, default=None, help="seconds per measurement (default 2, --small 0.05)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shape = SMALL if args.small else FULL
    min_run_time = args.min_run_time or (0.05 if args.small else 2.0)
    rows = time_attention(shape, device, dtype, min_run_time) + time_projections(shape, device, dtype, min_run_time)
    rows += time_block_float8(shape, device, dtype, min_run_time)
    for row in rows:
        print(json.dumps(row))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "shape": shape, "rows": rows}, handle, indent=2)
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
