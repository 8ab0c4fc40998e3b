"""One GRPO update on a fixed global batch of 8 (4 groups of 2, the first group scoring alike),
split over however many ranks torchrun starts.

Rank ``r`` of ``R`` takes slots ``[8r/R, 8(r+1)/R)``; the gradients are averaged over ranks as
FSDP2 does. Rank 0 writes ``{"gradient", "advantages", "loss"}`` to ``--out``. Every world size
must compute the same update: the advantages' std and the masked-group count are the global
batch's (``tests/test_grpo.py`` compares 1 and 2 ranks).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helpers import random_tiny_model  # noqa: E402
from test_grpo import OneConstantGroup, grpo_stage, shapes_batch  # noqa: E402

from krea2_train.conditioning.conditioner import build_conditioner  # noqa: E402
from krea2_train.parallel.distributed import destroy_distributed, init_distributed  # noqa: E402
from krea2_train.stages.base import StepContext  # noqa: E402

GLOBAL_BATCH = 8


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--text-encoder", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    info = init_distributed()
    conditioner = build_conditioner("pixel", args.text_encoder, max_text_tokens=64)
    batch = shapes_batch(GLOBAL_BATCH)
    local = GLOBAL_BATCH // info.world_size
    rows = slice(info.rank * local, (info.rank + 1) * local)
    part = {key: value[rows] for key, value in batch.items()}

    stage = grpo_stage("grpo.group_size=2", "grpo.beta_kl=0", "grpo.reweight_prompts=false")
    stage.rewards = OneConstantGroup(batch["facts"][0])
    model = random_tiny_model(0)
    ctx = StepContext(model=model, conditioner=conditioner, device=torch.device("cpu"), seed=0, step=0, first_slot=rows.start)
    stage.begin_step([(ctx, part)])
    loss, _ = stage.loss(ctx, part)
    loss.backward()
    gradient = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    dist.all_reduce(gradient)
    gradient /= info.world_size
    loss = loss.detach().reshape(1)
    dist.all_reduce(loss)
    advantages = [None] * info.world_size
    dist.all_gather_object(advantages, stage.buffers[0].advantages)
    if info.rank == 0:
        torch.save({"gradient": gradient, "advantages": torch.cat(advantages), "loss": loss / info.world_size}, args.out)
    destroy_distributed()


if __name__ == "__main__":
    main()
