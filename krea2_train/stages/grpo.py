"""Multi-reward GRPO for the flow DiT (Flow-GRPO style, no CFG anywhere): Krea 2's RL stage.

One rollout (every ``updates_per_rollout`` trainer steps), on this rank's batch of ``B = P * G``
slots: the batch entries ``0, G, 2G, ...`` are the ``P`` prompts (captions + shapes-world facts),
each used ``G = group_size`` times. The POLICY (the trained DiT, eval mode, no grad, no CFG)
samples from keyed noise over the sampler's grid (``inference_sigmas(num_steps, mu)``), taking
SDE steps inside a window of ``sde_window_size`` steps (Flow-GRPO-Fast; ODE elsewhere;
``krea2_train.flow.sde``); the images are decoded and scored (``krea2_train.rewards``), and the
rewards become group advantages ``A`` (global batch std + 1e-4, clipped, constant groups masked),
multiplied by each prompt's re-weighting (live statistics: too easy / hopeless / low-variance
prompts count less). The window's transitions ``(x_j, x_{j+1}, t_j, t_{j+1})`` and their
``log p_old`` form the rollout buffer, which the next ``updates_per_rollout`` trainer steps train
on (one optimizer step each). Per trained step ``j`` and sample ``i``::

    rho      = exp(log p_theta(x_{j+1} | x_j) - log p_old)          (per-dim-mean log-probs, fp32)
    L_policy = sum_{i,j} w_i max(-A_i rho, -A_i clip(rho, 1 - eps, 1 + eps)) / (J * #valid)
    L_KL     = mean_{i,j} mean_dims (mu_theta - mu_ref)^2 / (2 s_j^2)   (s_j = sigma_t for sde, std_j for cps;
                                                                        flow_grpo's scale: sde.policy_kl)
    L        = L_policy + beta_kl * L_KL

``w_i`` is 0 in constant-reward groups and the prompt weight otherwise; ``#valid`` counts the
samples of non-constant groups in the global batch. The reference is a frozen copy of
``stage.init_from``'s policy.

A rollout covers the whole step: the trainer calls ``begin_step`` with every micro-batch before
the first, and the stage rolls all of them out and scores them together, so the advantages' std,
``#valid`` and the prompt statistics are those of the global batch whatever ``grad_accum_steps``
and the number of ranks (each rank's micro-batch loss carries the share
``#valid / (ranks * grad_accum_steps)`` that the trainer's averaging turns back into ``#valid``).

``log p_old`` is the policy's log-prob recomputed right after the rollout with the exact
computation the loss uses (same batch layout, train mode, float32 step math), so the first update
of every rollout has ``rho == 1`` exactly and clipping acts only from the second update on (with
one update per rollout GRPO is group-baseline REINFORCE). ``logp_rollout_gap_max`` logs how far the
sampling pass's own log-probs were from it (eval vs train mode, batch layout).

Randomness is keyed (``StepContext.generator``): the initial noise (purpose INITIAL_NOISE, per
slot, or per group's first slot with ``same_initial_noise``), the SDE noise (SDE_NOISE, per slot)
and the window's start (SDE_WINDOW, shared by every rank). The buffer and the prompt statistics
are checkpointed (``state_dict``), so a run resumed between two updates of one rollout continues
exactly.

Data note: on the steps that re-use a buffer the loader's batch is not used (those prompts are
skipped, not delayed).
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from krea2_train.config.schema import RunConfig
from krea2_train.flow.sde import (
    SDE_TYPES,
    draw_normal,
    policy_kl,
    rollout,
    sde_step_mean_std,
    sde_window,
    step_log_prob,
)
from krea2_train.flow.sampler import guided_velocity
from krea2_train.flow.timesteps import inference_sigmas, mu_for_tokens
from krea2_train.parallel.distributed import all_gather_objects
from krea2_train.rewards.advantages import AGGREGATIONS, STD_SCOPES, aggregate_advantages
from krea2_train.rewards.prompt_weights import PromptReweighting, PromptStats
from krea2_train.rewards.registry import build_rewards
from krea2_train.stages.base import StageConfigError, StepContext, frozen_copy_of_initial, refuse_float8_against_a_reference

logger = logging.getLogger("krea2_train")

# Purposes of keyed randomness (distinct from NOISE, TIMESTEP, CAPTION_DROPOUT = 11, 12, 13).
INITIAL_NOISE, SDE_NOISE, SDE_WINDOW = 31, 32, 33


# ------------------------------------------------------------------------------------------------
# Pure math


def clipped_policy_loss(ratio: torch.Tensor, advantages: torch.Tensor, clip_range: float) -> torch.Tensor:
    """PPO's clipped surrogate per element: ``max(-A rho, -A clip(rho, 1 - eps, 1 + eps))``
    (``ratio`` and ``advantages`` broadcast together)."""
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)
    return torch.maximum(unclipped, clipped)


def group_success_stats(total: torch.Tensor, weight_sum: float, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group mean and std ``[P]`` of the success ``total / weight_sum`` (``total [B]``)."""
    success = (total.double() / weight_sum).reshape(-1, group_size)
    return success.mean(dim=1), success.std(dim=1, unbiased=False)


# ------------------------------------------------------------------------------------------------
# The rollout buffer


@dataclass
class RolloutBuffer:
    """One rank's rollout for one micro-batch: what its updates train on.

    ``J`` trained (SDE) steps, ``B`` samples, ``N`` tokens, ``C`` channels; tensors on the device.
    """

    rollout_step: int  # the trainer step that rolled it out
    slots: list[int]  # [B] global-batch slots
    captions: list[str]  # [B] (each prompt G times)
    prompt_ids: list[int]  # [B]
    grid: tuple[int, int]
    x: torch.Tensor  # [J, B, N, C] float32
    x_next: torch.Tensor  # [J, B, N, C] float32
    t: torch.Tensor  # [J] float32
    t_next: torch.Tensor  # [J] float32
    t_cap: float
    window: list[int]  # the J step indices
    log_prob_old: torch.Tensor  # [J, B]
    advantages: torch.Tensor  # [B] (clipped, 0 in constant groups)
    valid: torch.Tensor  # [B] bool (not in a constant group)
    prompt_weights: torch.Tensor  # [B]
    rewards: dict[str, torch.Tensor]  # name -> [B]
    total: torch.Tensor  # [B] weighted reward sum
    log_prob_gap: torch.Tensor  # [B] max over steps |log p (sampling pass) - log p_old|
    valid_global: int  # samples of non-constant groups in the rollout's global batch (#valid)
    text: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)  # not checkpointed

    SAMPLE_FIELDS = ("x", "x_next", "log_prob_old")  # [J, B, ...]: split on dim 1
    VECTOR_FIELDS = ("advantages", "valid", "prompt_weights", "total", "log_prob_gap")  # [B]

    def per_slot(self) -> dict[int, dict]:
        """Host copies, one record per slot (for checkpoints; re-assembled on any world size)."""
        records = {}
        for index, slot in enumerate(self.slots):
            record = {
                "rollout_step": self.rollout_step, "caption": self.captions[index], "prompt_id": self.prompt_ids[index],
                "grid": self.grid, "t": self.t.cpu(), "t_next": self.t_next.cpu(), "t_cap": self.t_cap,
                "window": list(self.window), "rewards": {k: v[index].cpu() for k, v in self.rewards.items()},
                "valid_global": self.valid_global,
            }
            record.update({name: getattr(self, name)[:, index].cpu() for name in self.SAMPLE_FIELDS})
            record.update({name: getattr(self, name)[index].cpu() for name in self.VECTOR_FIELDS})
            records[slot] = record
        return records

    @classmethod
    def from_slots(cls, records: dict[int, dict], slots: list[int], device: torch.device) -> RolloutBuffer | None:
        """Re-assemble the buffer of ``slots`` (None unless every slot is recorded, from one rollout)."""
        if not slots or any(slot not in records for slot in slots):
            return None
        chosen = [records[slot] for slot in slots]
        first = chosen[0]
        if any(r["rollout_step"] != first["rollout_step"] or r["window"] != first["window"] for r in chosen):
            return None
        fields = {name: torch.stack([r[name] for r in chosen], dim=1).to(device) for name in cls.SAMPLE_FIELDS}
        fields.update({name: torch.stack([r[name] for r in chosen]).to(device) for name in cls.VECTOR_FIELDS})
        rewards = {name: torch.stack([r["rewards"][name] for r in chosen]).to(device) for name in first["rewards"]}
        return cls(
            rollout_step=first["rollout_step"], slots=list(slots), captions=[r["caption"] for r in chosen],
            prompt_ids=[r["prompt_id"] for r in chosen], grid=tuple(first["grid"]), t=first["t"].to(device),
            t_next=first["t_next"].to(device), t_cap=first["t_cap"], window=list(first["window"]), rewards=rewards,
            valid_global=first["valid_global"], **fields,
        )


# ------------------------------------------------------------------------------------------------
# The stage


def validate_config(config: RunConfig) -> None:
    """Refuse bad ``grpo.*`` values (and their interplay with the batch and init_from), naming the key."""
    grpo = config.grpo
    if grpo.group_size < 2:
        raise StageConfigError(f"grpo.group_size must be >= 2 (a group-relative advantage needs a group), got {grpo.group_size}")
    if config.data.global_batch_size % (grpo.group_size * config.optim.grad_accum_steps):
        raise StageConfigError(
            f"data.global_batch_size={config.data.global_batch_size} must be a multiple of grpo.group_size="
            f"{grpo.group_size} x optim.grad_accum_steps={config.optim.grad_accum_steps} (each micro-batch holds whole groups)"
        )
    if grpo.num_steps < 2:
        raise StageConfigError(f"grpo.num_steps must be >= 2, got {grpo.num_steps}")
    if grpo.sde_type not in SDE_TYPES:
        raise StageConfigError(f"grpo.sde_type must be one of {SDE_TYPES}, got {grpo.sde_type!r}")
    high = 1.0 if grpo.sde_type == "cps" else float("inf")
    if not 0 < grpo.noise_level <= high:  # 0: a deterministic policy, whose log-probs are NaN (sde) or constant (cps)
        raise StageConfigError(f"grpo.noise_level={grpo.noise_level} must lie in (0, {high}] for sde_type={grpo.sde_type!r}")
    if config.parallel.tp != 1:  # the rollout's gathers run over every rank; TP ranks share their samples
        raise StageConfigError(f"the grpo stage does not support tensor parallelism (parallel.tp={config.parallel.tp}); use parallel.tp=1")
    if grpo.sde_window_size < 0 or len(grpo.sde_window_range) != 2:
        raise StageConfigError(f"grpo.sde_window_size must be >= 0 and grpo.sde_window_range a [lo, hi] pair, got "
                         f"{grpo.sde_window_size} and {grpo.sde_window_range}")
    try:
        sde_window(grpo.num_steps, grpo.sde_window_size, tuple(grpo.sde_window_range), 0.0)
    except ValueError as error:
        raise StageConfigError(f"grpo.sde_window_size / grpo.sde_window_range: {error}") from None
    if not grpo.clip_range > 0:
        raise StageConfigError(f"grpo.clip_range must be positive, got {grpo.clip_range}")
    if not grpo.adv_clip_max > 0:
        raise StageConfigError(f"grpo.adv_clip_max must be positive, got {grpo.adv_clip_max}")
    if grpo.beta_kl < 0:
        raise StageConfigError(f"grpo.beta_kl must be >= 0, got {grpo.beta_kl}")
    if grpo.beta_kl > 0:
        if config.stage.init_from is None:
            raise StageConfigError("grpo.beta_kl > 0 needs stage.init_from: the KL reference is the policy the stage starts from")
        refuse_float8_against_a_reference(config, "grpo.beta_kl > 0")
    if grpo.updates_per_rollout < 1:
        raise StageConfigError(f"grpo.updates_per_rollout must be >= 1, got {grpo.updates_per_rollout}")
    if grpo.aggregation not in AGGREGATIONS:
        raise StageConfigError(f"grpo.aggregation must be one of {AGGREGATIONS}, got {grpo.aggregation!r}")
    if grpo.std_scope not in STD_SCOPES:
        raise StageConfigError(f"grpo.std_scope must be one of {STD_SCOPES}, got {grpo.std_scope!r}")


class GrpoStage:
    def __init__(self, config: RunConfig) -> None:
        self.name = config.stage.name
        grpo = config.grpo
        self.config = grpo
        self.run_config = config
        self.group_size = grpo.group_size
        self.micro_batch_multiple = (grpo.group_size, f"each micro-batch holds whole groups of grpo.group_size={grpo.group_size}")
        self.curve = ("reward_mean", "mean reward of the rollouts (the policy loss is about 0 by construction)")
        validate_config(config)
        self.rewards = build_rewards(grpo.rewards)
        self.prompt_stats = PromptStats(PromptReweighting(
            enabled=grpo.reweight_prompts, ema=grpo.reweight_ema, min_visits=grpo.reweight_min_visits,
            saturation_margin=grpo.reweight_saturation_margin, min_std=grpo.reweight_min_std,
            min_weight=grpo.reweight_min_weight,
        ))
        self.buffers: dict[int, RolloutBuffer] = {}  # by micro-batch index
        self._restored: dict[int, dict] = {}  # checkpointed records by global slot, until a micro-batch takes them

    # -- the trainer's hooks ----------------------------------------------------------------------

    def frozen_models(self, initial_weights: dict[str, torch.Tensor] | None) -> dict[str, torch.nn.Module]:
        """``{"reference": the init_from policy}`` for the KL term (nothing when beta_kl = 0)."""
        if self.config.beta_kl == 0:
            return {}
        return {"reference": frozen_copy_of_initial(self.run_config, initial_weights)}

    def state_dict(self) -> dict[str, Any]:
        """One serialised blob, identical on every rank: the prompt statistics and every rank's
        rollout records by global slot (gathered here; a collective when distributed). Slots, not
        ranks or micro-batches, key them: a restart on another world size or accumulation
        re-assembles each micro-batch's buffer from the slots it is given."""
        local = dict(self._restored)  # restored, not yet taken
        for buffer in self.buffers.values():
            local.update(buffer.per_slot())
        merged: dict[int, dict] = {}
        for part in all_gather_objects(local):
            merged.update(part)
        payload = io.BytesIO()
        torch.save({"prompt_stats": self.prompt_stats.state_dict(), "rollouts": merged}, payload)
        return {"blob": payload.getvalue()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        blob = torch.load(io.BytesIO(state["blob"]), weights_only=False)
        self.prompt_stats.load_state_dict(blob["prompt_stats"])
        self.buffers = {}
        rollouts = blob["rollouts"]
        if rollouts and "rollout_step" not in next(iter(rollouts.values())):  # before 2026-11-24: by micro index, then slot
            rollouts = {slot: record for records in rollouts.values() for slot, record in records.items()}
        self._restored = rollouts

    # -- helpers ----------------------------------------------------------------------------------

    def _encode(self, ctx: StepContext, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        states, mask = ctx.conditioner.encode_text(captions)
        return states.to(ctx.device, ctx.dtype), mask.to(ctx.device)

    @staticmethod
    def _velocity(model, ctx: StepContext, x: torch.Tensor, t: torch.Tensor, text, grid: tuple[int, int]) -> torch.Tensor:
        """The DiT's velocity (float32, no CFG) at ``x [B, N, C]``, ``t [B]``, text ``([B, L, K, T], [B, L])``."""
        states, mask = text
        return guided_velocity(model, x.to(ctx.dtype), t.to(ctx.device, torch.float32), states, mask, *grid).float()

    def _step_log_probs(self, model, ctx: StepContext, buffer: RolloutBuffer, text) -> tuple[torch.Tensor, ...]:
        """The policy's log-probs ``[J, B]`` of the buffer's transitions, its step means and stds
        (``[J * B, N, C]`` and broadcastable), all trained steps in one forward of ``J * B``."""
        steps, batch = buffer.x.shape[:2]
        x = buffer.x.flatten(0, 1)
        t, t_next = buffer.t.repeat_interleave(batch), buffer.t_next.repeat_interleave(batch)
        states, mask = text
        repeated = (states.repeat(steps, 1, 1, 1), mask.repeat(steps, 1))
        velocity = self._velocity(model, ctx, x, t, repeated, buffer.grid)
        mean, std = sde_step_mean_std(
            velocity, x, t, t_next, noise_level=self.config.noise_level, sde_type=self.config.sde_type, t_cap=buffer.t_cap
        )
        log_prob = step_log_prob(buffer.x_next.flatten(0, 1), mean, std, self.config.sde_type)
        return log_prob.reshape(steps, batch), mean, std, repeated, (x, t, t_next)

    def _initial_noise(self, ctx: StepContext, slots: list[int], shape: tuple[int, ...]) -> torch.Tensor:
        group = self.group_size
        keys = [slots[i - i % group] if self.config.same_initial_noise else slots[i] for i in range(len(slots))]
        return draw_normal((len(slots), *shape), [ctx.generator(INITIAL_NOISE, key) for key in keys], ctx.device)

    # -- rollout ----------------------------------------------------------------------------------

    def begin_step(self, micro_steps: list[tuple[StepContext, dict[str, Any]]]) -> None:
        """The trainer's hook before a step's micro-batches: when their buffers are spent, roll out
        and score all of them together (see the module docstring)."""
        just_loaded = bool(self._restored)  # the same on every rank: one blob was loaded by all
        due = [self._current_buffer(ctx, batch) is None for ctx, batch in micro_steps]  # each takes its restored slots
        roll_out = any(due)
        if just_loaded:  # each rank re-assembled its own slots, so ranks may differ; the rollout is collective
            self._restored.clear()  # (a rank alone in it would wait forever), and what is left is no rank's
            roll_out = any(all_gather_objects(roll_out))
        if roll_out:
            self.collect(micro_steps)

    def collect(self, micro_steps: list[tuple[StepContext, dict[str, Any]]]) -> list[RolloutBuffer]:
        """Roll out the groups of every micro-batch with the policy, score them together and fill
        one buffer per micro-batch (kept by micro index)."""
        self._restored.clear()  # a checkpoint's older rollout: this one replaces it
        rolled = [self._roll_out(ctx, batch) for ctx, batch in micro_steps]
        buffers = [buffer for buffer, _ in rolled]
        rewards = {name: torch.cat([buffer.rewards[name] for buffer in buffers]) for name in buffers[0].rewards}
        result = aggregate_advantages(  # the std over every rank's samples of every micro-batch
            rewards, self.rewards.weights, self.group_size, aggregation=self.config.aggregation,
            adv_clip_max=self.config.adv_clip_max, std_scope=self.config.std_scope,
        )
        prompt_weights = self._prompt_weights(result.total, [prompt for buffer in buffers for prompt in buffer.prompt_ids])
        valid_global = sum(all_gather_objects(int(result.valid.sum())))  # host: the rewards were on the host already
        start = 0
        for (ctx, _), (buffer, sampling_log_prob) in zip(micro_steps, rolled):
            rows = slice(start, start + len(buffer.slots))
            start = rows.stop
            buffer.advantages, buffer.valid, buffer.total = result.advantages[rows], result.valid[rows], result.total[rows]
            buffer.prompt_weights = torch.tensor(prompt_weights[rows], dtype=torch.float32).to(ctx.device)
            buffer.valid_global = valid_global
            with torch.no_grad():  # log p_old: the loss's own computation, so the first update has rho == 1
                buffer.log_prob_old = self._step_log_probs(ctx.model, ctx, buffer, buffer.text)[0]
            buffer.log_prob_gap = (sampling_log_prob - buffer.log_prob_old).abs().amax(dim=0)
            self.buffers[ctx.micro_index] = buffer
        return buffers

    def _roll_out(self, ctx: StepContext, batch: dict[str, Any]) -> tuple[RolloutBuffer, torch.Tensor]:
        """Sample and score one micro-batch: its buffer without advantages, weights or ``log p_old``
        (``collect`` fills them), and the sampling pass's log-probs ``[J, B]``."""
        grpo, group = self.config, self.group_size
        size = len(batch["captions"])
        if size % group:
            raise ValueError(f"grpo: a micro-batch of {size} samples does not split into groups of grpo.group_size={group}")
        rows = [row - row % group for row in range(size)]  # each slot's prompt: its group's first entry
        captions = [batch["captions"][row] for row in rows]
        facts = [batch["facts"][row] for row in rows]
        prompt_ids = [int(value) for value in batch["sample_ids"][rows].tolist()]
        grid = ctx.conditioner.grid(*batch["images"].shape[-2:])
        slots = list(ctx.slots(size))
        text = self._encode(ctx, captions)
        channels = ctx.conditioner.autoencoder.latent_channels * ctx.conditioner.patch_size**2
        mu = grpo.mu if grpo.mu is not None else mu_for_tokens(grid.num_tokens)
        sigmas = inference_sigmas(grpo.num_steps, mu)  # host: times broadcast as scalars
        window = sde_window(grpo.num_steps, grpo.sde_window_size, tuple(grpo.sde_window_range), ctx.uniform(SDE_WINDOW, 0))
        noise = self._initial_noise(ctx, slots, (grid.num_tokens, channels))
        step_noise = [ctx.generator(SDE_NOISE, slot) for slot in slots]
        shape = (grid.height, grid.width)

        def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self._velocity(ctx.model, ctx, x, t.expand(size), text, shape)

        was_training = ctx.model.training
        ctx.model.eval()
        try:
            with torch.no_grad():
                sampled = rollout(velocity, noise, sigmas, window, step_noise, noise_level=grpo.noise_level, sde_type=grpo.sde_type)
        finally:
            ctx.model.train(was_training)

        images = ctx.conditioner.decode_tokens(sampled.final, grid)
        scores = self.rewards(images.float().cpu(), facts)  # host: the detectors are numpy
        rewards = {name: torch.as_tensor(value, dtype=torch.float64).to(ctx.device) for name, value in scores.items()}
        unset = torch.empty(0)
        buffer = RolloutBuffer(
            rollout_step=ctx.step, slots=slots, captions=captions, prompt_ids=prompt_ids, grid=shape,
            x=torch.stack([s.x for s in sampled.steps]), x_next=torch.stack([s.x_next for s in sampled.steps]),
            t=torch.stack([s.t for s in sampled.steps]).to(ctx.device),
            t_next=torch.stack([s.t_next for s in sampled.steps]).to(ctx.device), t_cap=sampled.t_cap,
            window=list(window), log_prob_old=unset, advantages=unset, valid=unset, prompt_weights=unset, rewards=rewards,
            total=unset, log_prob_gap=unset, valid_global=0, text=text,
        )
        return buffer, torch.stack([s.log_prob for s in sampled.steps])

    def _prompt_weights(self, total: torch.Tensor, prompt_ids: list[int]) -> list[float]:
        """Update the (global) per-prompt statistics with this step's groups (``total [B]``, the
        weighted reward sum); weights per slot."""
        group = self.group_size
        means, stds = group_success_stats(total.cpu(), sum(self.rewards.weights.values()), group)
        entries = list(zip(prompt_ids[::group], means.tolist(), stds.tolist()))
        for part in all_gather_objects(entries):  # rank order: the same table on every rank
            self.prompt_stats.update(part)
        return self.prompt_stats.weights(prompt_ids)

    def _current_buffer(self, ctx: StepContext, batch: dict[str, Any]) -> RolloutBuffer | None:
        """The micro-batch's buffer (kept, or restored from a checkpoint) while it is still being
        re-used; None when a new rollout is due."""
        index = ctx.micro_index
        slots = list(ctx.slots(len(batch["captions"])))
        buffer = self.buffers.get(index)
        if buffer is None and self._restored:
            buffer = RolloutBuffer.from_slots(self._restored, slots, ctx.device)
            for slot in slots:  # taken, or of no use to any micro-batch: a new rollout replaces them
                self._restored.pop(slot, None)
            if buffer is not None:
                self.buffers[index] = buffer
        if buffer is None or not 0 <= ctx.step - buffer.rollout_step < self.config.updates_per_rollout:
            return None
        if buffer.slots != slots:
            logger.warning("grpo: the rollout buffer of step %d does not fit step %d; rolling out again", buffer.rollout_step, ctx.step)
            return None
        return buffer

    # -- loss -------------------------------------------------------------------------------------

    def loss(self, ctx: StepContext, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The micro-batch's loss on its buffer (rolled out here when the trainer's ``begin_step``
        did not: then this micro-batch alone is the rollout's batch on this rank)."""
        buffer = self._current_buffer(ctx, batch) or self.collect([(ctx, batch)])[0]
        text = buffer.text if buffer.text is not None and buffer.rollout_step == ctx.step else self._encode(ctx, buffer.captions)
        log_prob, mean, std, repeated, (x, t, t_next) = self._step_log_probs(ctx.model, ctx, buffer, text)
        steps = log_prob.shape[0]
        # this micro-batch's share of #valid: the trainer averages over micro-batches and ranks
        ranks = dist.get_world_size() if dist.is_initialized() else 1
        valid_share = max(buffer.valid_global, 1) / (ranks * self.run_config.optim.grad_accum_steps)

        ratio = torch.exp(log_prob - buffer.log_prob_old)  # [J, B]
        per_element = clipped_policy_loss(ratio, buffer.advantages[None], self.config.clip_range)
        sample_weights = buffer.valid.float() * buffer.prompt_weights  # [B]
        loss_policy = (per_element * sample_weights[None]).sum() / (steps * valid_share)

        metrics = self._rollout_metrics(buffer)
        if self.config.beta_kl > 0:
            with torch.no_grad():
                reference_velocity = self._velocity(ctx.frozen["reference"], ctx, x, t, repeated, buffer.grid)
            reference_mean, _ = sde_step_mean_std(
                reference_velocity, x, t, t_next, noise_level=self.config.noise_level, sde_type=self.config.sde_type,
                t_cap=buffer.t_cap,
            )
            kl_per_sample = policy_kl(mean, reference_mean, std, t, t_next, self.config.sde_type).reshape(steps, -1)  # [J, B]
            # over the valid samples only, as the policy term: a constant-reward group trains nothing
            kl = (kl_per_sample * buffer.valid.float()[None]).sum() / (steps * valid_share)
            loss = loss_policy + self.config.beta_kl * kl
            metrics["kl"] = kl.detach()
        else:
            loss = loss_policy
        seen = ratio.detach()
        valid = buffer.valid[None].expand_as(seen)
        clipped = ((seen - 1).abs() > self.config.clip_range) & valid
        metrics.update(
            loss_policy=loss_policy.detach(),
            ratio_mean=seen.mean(),
            # per SDE step of the window: its low-noise steps drift first (GRPO-Guard)
            ratio_mean_first_step=seen[0].mean(),
            ratio_mean_last_step=seen[-1].mean(),
            ratio_min=seen.min(),  # the extremes over the global batch (the trainer's max/min reduction)
            ratio_max=seen.max(),
            clip_fraction=clipped.float().sum() / (steps * valid_share),  # of the global batch's valid elements
            update_index=ratio.new_tensor(float(ctx.step - buffer.rollout_step)),
        )
        return loss, metrics

    def _rollout_metrics(self, buffer: RolloutBuffer) -> dict[str, torch.Tensor]:
        """Metrics of the rollout the update trains on (derived from per-sample data only)."""
        valid = buffer.valid.float()
        metrics = {
            "reward_mean": buffer.total.float().mean(),
            **{f"reward_{name}_mean": value.float().mean() for name, value in buffer.rewards.items()},
            "advantage_abs_mean": buffer.advantages.abs().mean(),  # averages exactly over ranks (a std would not)
            "zero_std_ratio": 1.0 - valid.mean(),
            "prompt_weight_mean": buffer.prompt_weights.mean(),
            "logp_rollout_gap_max": buffer.log_prob_gap.max(),
            "sde_window_start": buffer.t.new_tensor(float(buffer.window[0])),
        }
        return {name: value.detach().float() for name, value in metrics.items()}
