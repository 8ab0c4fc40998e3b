"""Run under torchrun (gloo, 2 ranks): save or load a checkpoint of an FSDP2-sharded tiny Krea2DiT.

    fsdp_checkpoint.py save RUN_DIR REFERENCE   train 3 AdamW steps, checkpoint at step 3, and write
                                                the full (gathered) model and optimizer state to REFERENCE
    fsdp_checkpoint.py load RUN_DIR OUTPUT      load the newest checkpoint of RUN_DIR into a freshly
                                                sharded model and write the gathered state to OUTPUT
    fsdp_checkpoint.py fallback RUN_DIR STEPS   checkpoint steps 3 and 6, then load with rank 1 unable to
                                                read step 6's manifest; each rank writes the step it
                                                loaded to STEPS/rank-R
    fsdp_checkpoint.py tolerate RUN_DIR SEEN    checkpoint steps 3, 6 and 9 tolerating one failed save,
                                                rank 1's write of step 6 failing; each rank writes the
                                                failed and committed steps it saw to SEEN/rank-R
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from krea2_train.model import build_model
from krea2_train.model.patchify import position_ids
from krea2_train.train.checkpoint import CheckpointManager, ModelOptimizerState, TrainState


def sharded_model_and_optimizer(seed: int, mesh):
    torch.manual_seed(seed)
    model = build_model("tiny")
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(std=0.1)
    for block in model.transformer_blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


def train_step(model, optimizer, step: int) -> None:
    """Forward and backward on a per-rank random batch (FSDP averages the gradients)."""
    config = model.config
    generator = torch.Generator().manual_seed(1000 * step + dist.get_rank())
    text_len, grid_h, grid_w = 3, 2, 2
    hidden = torch.randn(2, grid_h * grid_w, config["in_channels"], generator=generator)
    text = torch.randn(2, text_len, config["num_text_layers"], config["text_hidden_dim"], generator=generator)
    timestep = torch.rand(2, generator=generator)
    velocity = model(hidden, text, timestep, position_ids(text_len, grid_h, grid_w))
    velocity.square().mean().backward()
    optimizer.step()
    optimizer.zero_grad()


def gathered_state(model, optimizer) -> dict:
    """The full state, on rank 0 (other ranks get empty dicts)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state, optimizer_state = get_state_dict(model, optimizer, options=options)
    return {"model": model_state, "optimizer": optimizer_state.get("state", {})}


def main(mode: str, run_dir: str, output: str) -> None:
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    if mode == "save":
        model, optimizer = sharded_model_and_optimizer(seed=0, mesh=mesh)
        for step in range(1, 4):
            train_step(model, optimizer, step)
        with CheckpointManager(run_dir, interval=3, async_mode="async", seed=7) as manager:
            manager.save(3, {"model": ModelOptimizerState(model, optimizer), "train_state": TrainState(step=3)})
        result = gathered_state(model, optimizer)
    elif mode == "load":
        model, optimizer = sharded_model_and_optimizer(seed=99, mesh=mesh)
        train_state = TrainState()
        CheckpointManager(run_dir, interval=1).load({"model": ModelOptimizerState(model, optimizer), "train_state": train_state})
        result = {**gathered_state(model, optimizer), "train_step": train_state.step}
    elif mode == "fallback":
        from pathlib import Path

        from krea2_train.train import checkpoint

        model, optimizer = sharded_model_and_optimizer(seed=0, mesh=mesh)
        with CheckpointManager(run_dir, interval=3, async_mode="sync") as manager:
            for step in (3, 6):
                train_step(model, optimizer, step)
                manager.save(step, {"model": ModelOptimizerState(model, optimizer), "train_state": TrainState(step=step)})
        if dist.get_rank() == 1:
            readable = checkpoint.read_manifest

            def flaky(path):
                if Path(path).name == "step-00000006":
                    raise checkpoint.CheckpointVerificationError(f"{path}: stat failed (a flaky mount)")
                return readable(path)

            checkpoint.read_manifest = flaky
        train_state = TrainState()
        CheckpointManager(run_dir, interval=1).load({"model": ModelOptimizerState(model, optimizer), "train_state": train_state})
        Path(output).mkdir(exist_ok=True)
        (Path(output) / f"rank-{dist.get_rank()}").write_text(str(train_state.step))
        result = None
    elif mode == "tolerate":
        import errno
        import json
        from pathlib import Path

        from torch.distributed.checkpoint import FileSystemWriter

        from krea2_train.train import checkpoint

        class FailingOnRank1(FileSystemWriter):
            def write_data(self, plan, planner):
                if dist.get_rank() == 1:
                    raise OSError(errno.EIO, "Input/output error")
                return super().write_data(plan, planner)

        writer = checkpoint._storage_writer
        model, optimizer = sharded_model_and_optimizer(seed=0, mesh=mesh)
        with CheckpointManager(run_dir, interval=3, async_mode="async", tolerated_failures=1) as manager:
            for step in (3, 6, 9):
                train_step(model, optimizer, step)
                checkpoint._storage_writer = (lambda path: FailingOnRank1(str(path), single_file_per_rank=True)) if step == 6 else writer
                manager.save(step, {"model": ModelOptimizerState(model, optimizer), "train_state": TrainState(step=step)})
            manager.wait()
            seen = {"failed": [step for step, _ in manager.failed_saves], "committed": sorted(manager.committed())}
        Path(output).mkdir(exist_ok=True)
        (Path(output) / f"rank-{dist.get_rank()}").write_text(json.dumps(seen))
        result = None
    else:
        raise SystemExit(f"unknown mode {mode!r}; expected save, load, fallback or tolerate")
    if dist.get_rank() == 0 and result is not None:
        torch.save(result, output)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
