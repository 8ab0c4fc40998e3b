"""Train the tiny Krea2DiT for a few AdamW steps on a fixed synthetic global batch.

Run under torchrun (``torchrun --standalone --nproc_per_node N tests/distributed/train_tiny.py
--dp-shard 2 --tp 2 --out result.pt``) or call :func:`train` in a single process. Every run, whatever
its parallelism, sees the same global batch each step: data-parallel rank ``r`` of ``R`` takes rows
``[r B/R, (r + 1) B/R)``, TP ranks of one data-parallel group take the same rows. The loss is the
flow-matching MSE averaged over the global batch, so every layout computes the same numbers.
Rank 0 writes ``{"losses", "grad_norms", "weights"}`` (full, unsharded weights) to ``--out``.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from krea2_train.model import build_model
from krea2_train.parallel.distributed import destroy_distributed, init_distributed
from krea2_train.parallel.grads import all_ranks_finite, clip_grad_norm_
from krea2_train.parallel.mesh import build_parallel_dims, data_parallel_rank_size
from krea2_train.parallel.parallelize import parallelize_dit

GLOBAL_BATCH = 4
TEXT_TOKENS = 8
IMAGE_SIDE = 4  # 4 x 4 = 16 image tokens; S = 24 is divisible by tp in {1, 2, 4}
MAX_GRAD_NORM = 0.5  # small enough that clipping is active


def build_reference_model() -> torch.nn.Module:
    """The tiny preset with every parameter perturbed, so no path starts at zero (gates, outputs)."""
    torch.manual_seed(0)
    model = build_model("tiny")
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return model


def global_batch(step: int, config: dict) -> dict[str, torch.Tensor]:
    """The step's global batch: latents, text states and mask, times, noise (seeded by step)."""
    generator = torch.Generator().manual_seed(1000 + step)
    channels = config["in_channels"]
    image_tokens = IMAGE_SIDE * IMAGE_SIDE
    text_lengths = torch.randint(2, TEXT_TOKENS + 1, (GLOBAL_BATCH,), generator=generator)
    return dict(
        x0=torch.randn(GLOBAL_BATCH, image_tokens, channels, generator=generator),
        noise=torch.randn(GLOBAL_BATCH, image_tokens, channels, generator=generator),
        t=torch.rand(GLOBAL_BATCH, generator=generator),
        text=torch.randn(
            GLOBAL_BATCH, TEXT_TOKENS, config["num_text_layers"], config["text_hidden_dim"], generator=generator
        ),
        text_mask=torch.arange(TEXT_TOKENS)[None, :] < text_lengths[:, None],
    )


def position_ids() -> torch.Tensor:
    """``[L + N, 3]``: text tokens on the diagonal of frame 0, image tokens on a grid in frame 1."""
    text = torch.arange(TEXT_TOKENS)[:, None].expand(-1, 3) * torch.tensor([0, 1, 1])
    rows, cols = torch.meshgrid(torch.arange(IMAGE_SIDE), torch.arange(IMAGE_SIDE), indexing="ij")
    image = torch.stack([torch.ones_like(rows), rows, cols], dim=-1).reshape(-1, 3)
    return torch.cat([text, image])


def flow_matching_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean over this rank's rows of ``|v_pred - (eps - x0)|^2`` at ``x_t = (1 - t) x0 + t eps``."""
    t = batch["t"][:, None, None]
    x_t = (1 - t) * batch["x0"] + t * batch["noise"]
    velocity = model(x_t, batch["text"], batch["t"], position_ids(), batch["text_mask"])
    return (velocity - (batch["noise"] - batch["x0"])).square().mean()


def _plain_name(name: str) -> str:
    """A parameter name without activation-checkpointing / compile wrapper prefixes."""
    return name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """The unsharded value of a (possibly DTensor) tensor; a collective for DTensors."""
    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().clone()


def full_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded weights (every rank must call)."""
    return {_plain_name(key): _full(value) for key, value in model.state_dict().items()}


def train(
    dp_replicate: int = 1,
    dp_shard: int = -1,
    tp: int = 1,
    steps: int = 4,
    activation_checkpoint: str = "none",
    compile: bool = False,
    fsdp: bool | None = None,
    optimizer: str = "foreach",
) -> dict:
    """Train and return ``{"losses", "grad_norms", "weights", "grads"}`` (grads of the first step).

    ``optimizer``: AdamW's implementation, ``foreach`` (the clip scales the gradients in place) or
    ``fused`` (the clip rides in the step as its grad scale, as the trainer does on CUDA).
    """
    info = init_distributed(timeout_s=120)
    parallel_dims = build_parallel_dims(dp_replicate, dp_shard, tp, info.world_size)
    dp_rank, dp_size = data_parallel_rank_size(parallel_dims)
    batch_mesh = parallel_dims.get_optional_mesh("batch")
    model = build_reference_model()
    config = model.config
    parallelize_dit(model, parallel_dims, activation_checkpoint=activation_checkpoint, compile=compile, fsdp=fsdp)
    fused = optimizer == "fused"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, **{optimizer: True})

    rows = slice(dp_rank * GLOBAL_BATCH // dp_size, (dp_rank + 1) * GLOBAL_BATCH // dp_size)
    losses, grad_norms, first_grads = [], [], None
    for step in range(steps):
        local_batch = {k: v[rows] for k, v in global_batch(step, config).items()}
        loss = flow_matching_loss(model, local_batch)
        loss.backward()
        if first_grads is None:
            first_grads = {_plain_name(name): _full(p.grad) for name, p in model.named_parameters()}
        grad_norm = clip_grad_norm_(model.parameters(), MAX_GRAD_NORM, into=optimizer if fused else None)
        if not all_ranks_finite(grad_norm):
            raise RuntimeError(f"non-finite gradient norm at step {step}")
        optimizer.step()
        optimizer.zero_grad()
        global_loss = loss.detach().clone()
        if batch_mesh is not None:
            dist.all_reduce(global_loss, group=batch_mesh.get_group())
            global_loss /= dp_size
        losses.append(global_loss.item())
        grad_norms.append(grad_norm.item())
    return dict(losses=losses, grad_norms=grad_norms, weights=full_weights(model), grads=first_grads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dp-replicate", type=int, default=1)
    parser.add_argument("--dp-shard", type=int, default=-1)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--activation-checkpoint", default="none")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--optimizer", choices=["foreach", "fused"], default="foreach")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    result = train(
        args.dp_replicate, args.dp_shard, args.tp, args.steps, args.activation_checkpoint, args.compile,
        optimizer=args.optimizer,
    )
    if dist.get_rank() == 0:
        torch.save(result, args.out)
    destroy_distributed()


if __name__ == "__main__":
    main()
