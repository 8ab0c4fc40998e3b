"""STPO: preference optimisation on winner/loser pairs that does not pull the model off its data.

Flow DPO (Diffusion-DPO in velocity form). For a pair sharing one noise ``eps`` and one time
``t``, each image's error is the per-element mean squared velocity error,

    e_θ(x) = mean ‖(eps − x0) − v_θ(x_t, t, c)‖²,     e_ref(x) likewise with the frozen reference,

and with ``Δ = [e_θ(w) − e_ref(w)] − [e_θ(l) − e_ref(l)]`` the DPO loss is
``−log σ(−(β/2) Δ)``: it lowers the winner's error relative to the reference and raises the
loser's. Its known failure, and the one Krea's STPO exists to stop, is that the margin also grows
when *both* errors rise: the model drifts off the pretraining distribution and high-frequency
artifacts appear late in training.

Krea's report says only that STPO adds an auxiliary loss and modifies the DPO objective. The
published formula does not exist; this module's objective is our stand-in, built from the public
fixes of the same failure (../shared/reference/algorithms.md §2), every part switchable:

    inside = −(β/2) · [Δ + λ_p · max(0, e_θ(w) − e_ref(w))]          (DPO-Positive, ``positive_weight``)
    L      = −log σ(inside) + λ_sft · e_θ(w)                           (SFT anchor, ``sft_weight``)

and the Diffusion-SDPO safeguard (``safeguard``): the loser branch's gradient is scaled by

    λ = clip((1 − μ) ‖g_w‖² / ⟨g_l, g_w⟩, 0, 1)   when ⟨g_l, g_w⟩ > 0, else 1,

with ``g = ∂e/∂v`` (output-space proxies of the parameter gradients), which to first order keeps
the winner's error from rising on the loser's account. The value of the loss is unchanged; only
the loser's gradient is scaled (``e_l' = sg(e_l) + λ (e_l − sg(e_l))``).

Pairs. The winner is the dataset image. The loser (``stpo.loser``) is either the policy's own
sample for the caption, drawn each step without gradients (on-policy, as Krea's synthetic pairs
mostly have one on-policy member), or the winner with synthetic high-frequency artifacts (cheap,
and exactly the failure to push away from), or, for the recipe's calibration phase on human
annotations (``configs/stage/stpo_human.yaml``), the loser a person chose against the winner:
the run then reads preference pairs (:mod:`krea2_train.data.pairs`), and its batches carry
``loser_images`` next to ``images``. β depends on the error's scale (mean, not sum;
velocity, not noise: an ε-space β equals a v-space β / (1 − t)²), so never copy β across setups.

Metrics: ``loss_dpo``, ``loss_sft``, ``implicit_acc`` (pairs whose DPO margin ``-(β/2) Δ`` is > 0),
``winner_gap``/``loser_gap`` (mean ``e_θ − e_ref`` of each branch; a winner gap that stays
positive is the drift: :meth:`PreferenceStage.end_step` raises the alarm), ``safeguard_scale`` (mean λ).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from krea2_train.config.schema import RunConfig
from krea2_train.flow.sampler import resolve_sampler_settings, sample, texts_at_one_length
from krea2_train.flow.timesteps import interpolate, velocity_target
from krea2_train.model.patchify import position_ids
from krea2_train.stages.base import StageConfigError, StepContext, frozen_copy_of_initial, refuse_float8_against_a_reference
from krea2_train.stages.flow_matching import FlowMatchingStage

# keyed-randomness purposes (see stages/base.py)
LOSER_NOISE, ARTIFACT_NOISE = 31, 32

LOSER_SOURCES = ("policy", "artifacts", "dataset")


class PreferenceStageError(StageConfigError):
    """A stpo-stage configuration that cannot train."""


@dataclass(frozen=True)
class StpoObjective:
    """The STPO loss's settings (see the module docstring)."""

    beta: float
    positive_weight: float = 0.0
    sft_weight: float = 0.0
    safeguard: bool = False
    safeguard_mu: float = 0.0


def per_sample_error(velocity: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``mean ‖target − velocity‖²`` over every dim but the first: ``[B, ...] -> [B]`` (float32)."""
    return (target.float() - velocity.float()).pow(2).flatten(1).mean(1)


def safeguard_scale(residual_winner: torch.Tensor, residual_loser: torch.Tensor, mu: float) -> torch.Tensor:
    """Diffusion-SDPO's per-pair loser-gradient scale λ ``[B]`` (detached).

    ``residual = velocity − target`` of each branch, ``[B, ...]``; ``∂e/∂v`` is proportional to it
    with the same factor for both branches, so the ratio uses residuals directly.
    """
    g_w, g_l = residual_winner.detach().float().flatten(1), residual_loser.detach().float().flatten(1)
    dot = (g_w * g_l).sum(1)
    ratio = (1 - mu) * g_w.pow(2).sum(1) / dot.where(dot > 0, torch.ones_like(dot))
    return torch.where(dot > 0, ratio.clamp(0.0, 1.0), torch.ones_like(dot))


def stpo_loss(
    objective: StpoObjective,
    velocity_winner: torch.Tensor,
    velocity_loser: torch.Tensor,
    reference_winner: torch.Tensor,
    reference_loser: torch.Tensor,
    target_winner: torch.Tensor,
    target_loser: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The STPO loss of B pairs and its metrics.

    Args:
        velocity_winner, velocity_loser: the policy's velocities ``[B, ...]`` (with gradients).
        reference_winner, reference_loser: the frozen reference's velocities ``[B, ...]``.
        target_winner, target_loser: ``eps − x0`` of each branch ``[B, ...]`` (the pair shares
            ``eps`` and ``t``).
    Returns:
        the mean loss over pairs (0-dim) and 0-dim metrics (see the module docstring).
    """
    error_w = per_sample_error(velocity_winner, target_winner)
    error_l = per_sample_error(velocity_loser, target_loser)
    with torch.no_grad():
        reference_error_w = per_sample_error(reference_winner, target_winner)
        reference_error_l = per_sample_error(reference_loser, target_loser)
    scale = torch.ones_like(error_l)
    if objective.safeguard:
        scale = safeguard_scale(velocity_winner - target_winner, velocity_loser - target_loser, objective.safeguard_mu)
        error_l = error_l.detach() + scale * (error_l - error_l.detach())
    gap_w, gap_l = error_w - reference_error_w, error_l - reference_error_l
    margin = -0.5 * objective.beta * (gap_w - gap_l)  # the DPO margin: > 0 when the policy prefers the winner
    # relu, not clamp_min: no gradient at gap_w == 0 (the first step, policy == reference)
    inside = margin - 0.5 * objective.beta * objective.positive_weight * F.relu(gap_w)
    loss_dpo = -F.logsigmoid(inside).mean()  # per pair, then the mean (not logsigmoid of the mean)
    loss_sft = error_w.mean()
    loss = loss_dpo + objective.sft_weight * loss_sft if objective.sft_weight else loss_dpo
    metrics = {
        "loss_dpo": loss_dpo.detach(),
        "loss_sft": loss_sft.detach(),
        "implicit_acc": (margin.detach() > 0).float().mean(),  # of the DPO margin, without the penalty
        "winner_gap": gap_w.detach().mean(),
        "loser_gap": gap_l.detach().mean(),
        "safeguard_scale": scale.mean(),
    }
    return loss, metrics


def add_artifacts(images: torch.Tensor, strength: float, generators: list[torch.Generator]) -> torch.Tensor:
    """The images with per-pixel ±``strength`` noise (one generator per image), clamped to [-1, 1].

    images ``[B, 3, H, W]`` in [-1, 1] -> the same shape: the high-frequency texture that a model
    drifting off its data shows, applied to the winner so the pair differs only in it.
    """
    signs = torch.stack([torch.randint(0, 2, images.shape[1:], generator=g) for g in generators]).to(images.device)
    return (images + strength * (2.0 * signs.to(images.dtype) - 1.0)).clamp(-1.0, 1.0)


DRIFT_ALARM_STEPS = 50  # steps in a row with winner_gap > 0 before the drift alarm (and every as many after)


class PreferenceStage(FlowMatchingStage):
    """STPO on (dataset winner; policy-sample, artifact or dataset loser) pairs against a frozen reference."""

    def __init__(self, config: RunConfig) -> None:
        stpo = config.stpo
        if config.stage.init_from is None:
            raise PreferenceStageError(
                f"stage {config.stage.name!r} (kind stpo) needs stage.init_from: the model to align, which is also "
                "its frozen reference (e.g. stage.init_from=sft)"
            )
        if stpo.loser not in LOSER_SOURCES:
            raise PreferenceStageError(f"stpo.loser must be one of {LOSER_SOURCES}, got {stpo.loser!r}")
        if stpo.beta <= 0:
            raise PreferenceStageError(f"stpo.beta must be > 0, got {stpo.beta}")
        if stpo.loser_steps < 1:
            raise PreferenceStageError(f"stpo.loser_steps must be >= 1, got {stpo.loser_steps}")
        for key in ("positive_weight", "sft_weight", "loser_guidance"):  # a negative weight rewards the drift it should stop
            if getattr(stpo, key) < 0:
                raise PreferenceStageError(f"stpo.{key} must be >= 0, got {getattr(stpo, key)}")
        if stpo.artifact_strength <= 0:
            raise PreferenceStageError(f"stpo.artifact_strength must be > 0 (0 makes the loser the winner), got {stpo.artifact_strength}")
        if not 0.0 <= stpo.safeguard_mu < 1.0:
            raise PreferenceStageError(f"stpo.safeguard_mu must be in [0, 1), got {stpo.safeguard_mu}")
        if config.irepa.enabled:
            raise PreferenceStageError("irepa.enabled is not supported by the stpo stage (iREPA belongs to pretraining)")
        refuse_float8_against_a_reference(config, "the stpo stage")
        super().__init__(config)
        self.config = config
        self.objective = StpoObjective(
            beta=stpo.beta, positive_weight=stpo.positive_weight, sft_weight=stpo.sft_weight,
            safeguard=stpo.safeguard, safeguard_mu=stpo.safeguard_mu,
        )
        self.loser = stpo.loser
        self.loser_steps, self.loser_guidance = stpo.loser_steps, stpo.loser_guidance
        self.artifact_strength = stpo.artifact_strength
        self.winner_gap_streak = 0  # steps in a row whose (global) winner_gap was > 0

    # the drift alarm's streak is checkpointed (a resumed run raises it when the uninterrupted one
    # would); checkpoints from before it was saved lack it
    optional_state_keys = ("winner_gap_streak",)

    def state_dict(self) -> dict[str, int]:
        return {"winner_gap_streak": self.winner_gap_streak}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.winner_gap_streak = int(state.get("winner_gap_streak", 0))

    def end_step(self, step: int, values: dict[str, float]) -> list[str]:
        """The drift alarm: ``winner_gap > 0`` (the policy fits the dataset winners worse than the
        reference) for :data:`DRIFT_ALARM_STEPS` steps in a row, the failure STPO guards against."""
        self.winner_gap_streak = self.winner_gap_streak + 1 if values["winner_gap"] > 0 else 0
        if self.winner_gap_streak == 0 or self.winner_gap_streak % DRIFT_ALARM_STEPS:
            return []
        return [
            f"stpo drift: winner_gap > 0 for {self.winner_gap_streak} steps in a row (now {values['winner_gap']:.3g}): the "
            "policy fits the dataset winners worse than its reference; raise stpo.positive_weight or stpo.sft_weight, or lower optim.lr"
        ]

    def frozen_models(self, initial_weights: dict[str, torch.Tensor] | None) -> dict[str, torch.nn.Module]:
        """The reference: the initial policy, exactly (else the first loss is not ln 2)."""
        return {"reference": frozen_copy_of_initial(self.config, initial_weights)}

    def loser_tokens(
        self, ctx: StepContext, batch: dict[str, Any], images: torch.Tensor, winners: torch.Tensor, grid, text_states, text_mask
    ) -> torch.Tensor:
        """The losers' clean tokens ``[B, N, C]``: the pairs' own losers, the policy's samples, or
        the winners with artifacts."""
        if self.loser == "dataset":
            if "loser_images" not in batch:
                raise PreferenceStageError(
                    "stpo.loser=dataset needs batches of preference pairs (loser_images): the data is single images"
                )
            return ctx.conditioner.encode_images(batch["loser_images"].to(ctx.device, non_blocking=True))[0]
        if self.loser == "artifacts":
            generators = [ctx.generator(ARTIFACT_NOISE, slot) for slot in ctx.slots(images.shape[0])]
            return ctx.conditioner.encode_images(add_artifacts(images, self.artifact_strength, generators))[0]
        noise = torch.stack([torch.randn(winners.shape[1:], generator=ctx.generator(LOSER_NOISE, slot)) for slot in ctx.slots(winners.shape[0])])
        settings = resolve_sampler_settings("raw", grid.num_tokens, num_steps=self.loser_steps, guidance_scale=self.loser_guidance)
        negative = (None, None)
        if settings.guidance_scale > 0:  # both texts at one length: the same forwards on every rank
            (text_states, text_mask), negative = texts_at_one_length((text_states, text_mask), ctx.conditioner.encode_text([""]))
        was_training = ctx.model.training
        ctx.model.eval()
        with torch.no_grad():
            tokens = sample(
                ctx.model, noise.to(ctx.device, ctx.dtype), text_states.to(ctx.device, ctx.dtype), text_mask.to(ctx.device),
                grid.height, grid.width, num_steps=settings.num_steps, guidance_scale=settings.guidance_scale, mu=settings.mu,
                negative_text_states=None if negative[0] is None else negative[0].to(ctx.device, ctx.dtype),
                negative_text_mask=None if negative[1] is None else negative[1].to(ctx.device),
            )
        ctx.model.train(was_training)
        return tokens.float()

    def loss(self, ctx: StepContext, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        images = batch["images"].to(ctx.device, non_blocking=True)
        captions = list(batch["captions"])  # no caption dropout: a preference is about this prompt
        winners, grid = ctx.conditioner.encode_images(images)  # [B, N, C]
        text_states, text_mask = ctx.conditioner.encode_text(captions)  # [B, L, K, T], [B, L]
        losers = self.loser_tokens(ctx, batch, images, winners, grid, text_states, text_mask)
        noise, t = self.noise_and_times(ctx, winners.shape, grid.num_tokens)  # shared by both members of a pair
        pairs_x0 = torch.cat([winners, losers])  # [2B, N, C]: winners then losers
        pairs_noise, pairs_t = torch.cat([noise, noise]), torch.cat([t, t])
        x_t = interpolate(pairs_x0, pairs_noise, pairs_t)
        text_states = text_states.to(ctx.device, ctx.dtype).repeat(2, 1, 1, 1)
        text_mask = text_mask.to(ctx.device).repeat(2, 1)
        positions = position_ids(text_states.shape[1], grid.height, grid.width, device=ctx.device)
        inputs = (x_t.to(ctx.dtype), text_states, pairs_t, positions, text_mask)
        velocity = ctx.model(*inputs).float()
        with torch.no_grad():
            reference = ctx.frozen["reference"](*inputs).float()
        target = velocity_target(pairs_x0, pairs_noise)
        b = winners.shape[0]
        loss, metrics = stpo_loss(
            self.objective, velocity[:b], velocity[b:], reference[:b], reference[b:], target[:b], target[b:]
        )
        metrics["t_mean"] = t.mean()
        return loss, metrics
