"""What a stage is: the networks it needs, what its batches hold, and its loss.

Everything else (mesh, sharding, precision, checkpoints, resume, logging, failure handling)
belongs to the trainer in ``krea2_train.train``.

Randomness in a loss (noise, timesteps, caption dropout) is keyed by (seed, step, slot), where
``slot`` is the sample's position in the global batch, never drawn from a stateful generator: a
resumed run, or one resumed on another world size, draws exactly the same numbers. Dropout inside
the model (``lora.dropout``) is the exception: its masks come from the global generators, seeded
per rank, so they repeat on a resume at the same world size but not on another.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from krea2_train.conditioning.conditioner import Conditioner
from krea2_train.data.plan import hash_u64, unit_interval
from krea2_train.errors import Krea2Error

# Purposes of keyed randomness (distinct streams per purpose).
NOISE, TIMESTEP, CAPTION_DROPOUT = 11, 12, 13


@dataclass
class StepContext:
    """What a stage's loss sees of the trainer in one (micro-)step."""

    model: torch.nn.Module
    conditioner: Conditioner
    device: torch.device
    seed: int
    step: int
    first_slot: int  # position of this rank's first sample in the global batch
    dtype: torch.dtype = torch.float32
    frozen: dict[str, torch.nn.Module] = field(default_factory=dict)  # the stage's frozen_models, by name
    micro_index: int = 0  # this micro-batch's index in the step's gradient accumulation

    def slots(self, batch_size: int) -> range:
        return range(self.first_slot, self.first_slot + batch_size)

    def generator(self, purpose: int, slot: int) -> torch.Generator:
        """A CPU generator determined by (seed, purpose, step, slot)."""
        seed = int(hash_u64((self.seed, purpose, self.step), slot)) & ((1 << 63) - 1)
        return torch.Generator().manual_seed(seed)

    def uniform(self, purpose: int, slot: int) -> float:
        return unit_interval((self.seed, purpose, self.step), slot)


class Stage(Protocol):
    """A training objective.

    Optional parts, each used by the trainer when the stage defines it:

    - ``prepare_model(model) -> model``: called once after the weights are initialised or loaded
      and before parallelisation: LoRA injection, freezing, or attaching training-only modules
      under ``model.auxiliary`` (trained, checkpointed, never exported).
    - ``frozen_models(initial_weights) -> {name: module}``: networks that never train (a reference
      policy, a teacher), built on every start from ``stage.init_from``'s weights (None without
      one); the trainer moves them to the device, shards them like the DiT and passes them as
      ``ctx.frozen``. They are not checkpointed.
    - ``lr_scales``: ``{parameter-name prefix: multiplier of optim.lr}``; each prefix is also a
      network whose gradients are clipped on their own (``train.trainer.trained_networks``).
    - ``sample_settings(num_image_tokens) -> SamplerSettings``: the sampler of the run's sample
      grids, in place of ``logging.sample_*`` (a distilled student samples on its own grid).
    - ``update_phases``: names of the updates of one step, in order (TDM: ``("fake_score",
      "generator")``). The trainer then calls ``loss(ctx, batch, phase)`` for every micro-batch of
      a phase, clips and steps the optimizer after it (only parameters with gradients move), and
      goes to the next phase, whose losses see that update.
    - ``micro_batch_multiple``: ``(n, why)``: each rank's micro-batch must hold a multiple of n
      samples (GRPO: whole groups); the trainer refuses a batch, world size and accumulation that
      break it before any heavy work, with ``why`` in the message.
    - ``curve``: ``(metric, title)`` drawn in ``loss.png`` in place of ``loss_fm``/``loss``.
    - ``begin_step(micro_steps)``: called once per step, before any loss, with every micro-batch
      of the step as ``[(StepContext, batch)]`` (GRPO rolls out and scores the whole step here).
    - ``state_dict()`` / ``load_state_dict(state)``: state the stage carries between steps,
      checkpointed with the run (keep it small and the same on every rank, or keyed by rank).
    """

    name: str

    def loss(self, ctx: StepContext, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Mean loss over this rank's batch, and metrics to log as 0-dim tensors (never read on
        the host here: the trainer averages them over micro-batches and ranks in the step's one
        all-reduce). Every rank must return the same metric names in a step."""
        ...


def frozen_copy_of_initial(config, initial_weights: dict[str, torch.Tensor] | None) -> torch.nn.Module:
    """A Krea2DiT of the run's model config holding ``stage.init_from``'s weights: a stage's frozen
    reference or teacher (see ``Stage.frozen_models``)."""
    from krea2_train.model.presets import build_model

    if initial_weights is None:
        raise StageConfigError(
            f"stage {config.stage.name!r} (kind {config.stage.kind!r}) needs stage.init_from: its frozen copy of the "
            "initial model is built from those weights"
        )
    model = build_model(config.model.preset, **config.model.overrides)
    model.load_state_dict(initial_weights, strict=True)
    return model


class StageConfigError(Krea2Error, ValueError):
    """Stage settings that cannot train (the message names the key); raised before any heavy work."""


def refuse_float8_against_a_reference(config, what: str) -> None:
    """A frozen reference is the initial policy in the compute dtype (never float8): a float8
    policy would differ from it before any update (STPO's first loss would not be ln 2, GRPO's KL
    would not start at 0). The recipe trains in float8 only in low-resolution pretraining."""
    if config.float8.enabled:
        raise StageConfigError(
            f"float8.enabled is not supported with {what}: the frozen reference runs in the compute dtype (bf16), so a float8 policy "
            "would differ from it before any update; post-train in bf16 (float8.enabled=false)"
        )
