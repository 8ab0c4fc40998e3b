"""TDM: data-free distillation of the teacher (with CFG baked in) into a few-step student (Krea 2 Turbo).

Trajectory Distribution Matching (Luo et al., arXiv 2503.06674) in its flow-matching form
(``x_sigma = (1 - sigma) x0 + sigma eps``, ``x0_hat = x - sigma v``, ``eps_hat = x + (1 - sigma) v``).
Three networks: the frozen teacher (``stage.init_from``), the student G (the trained model, initialised
from the teacher) and a fake score f_psi (``model.auxiliary["tdm_fake_score"]``, initialised from the
teacher, trained, checkpointed, never exported). Only prompts are used, never images.

One iteration, per sample of the batch:

1. Rollout (no grad): the student runs its K-step grid ``1 = sigma_0 > ... > sigma_K = 0`` (the
   Turbo sampler's shifted sigmas) from keyed noise with deterministic DDIM-like steps on its own
   prediction, ``x_{k+1} = (1 - sigma_{k+1}) x0_hat_k + sigma_{k+1} eps_hat_k`` (for a flow model
   this is exactly the Euler step, so the rollout is the Turbo sampler at guidance 0).
2. Draw a step ``k``, an intermediate ``s`` (the interval's lower end, or uniform inside it with
   ``use_randmid``) and ``tau ~ U[s, sigma_k - margin]`` inside the step's own interval
   (``use_separate``; otherwise up to ``1 - margin``). Recompute ``(x0_k, eps_hat) = G(x_k)`` with grad.
3. Deterministic re-noise ``x_s = (1 - s) sg(x0_k) + s sg(eps_hat)``, then the forward transition
   ``s -> tau`` (``a = (1 - tau)/(1 - s)``, ``beta^2 = tau^2 - (a s)^2``)::

       x_tau = a x_s + beta z,        xi = (a s eps_hat + beta z) / tau     (the post-fix xi, with s)

   so that ``x_tau = (1 - tau) x0_k + tau xi`` exactly: ``xi`` is x_tau's effective noise.
4. Fake-score loss (grads only into f_psi), its targets the student's detached ``x0_k``::

       L_fake = mean_b[ min(SNR(tau), snr_clip) w_IS mean|x0_fake(x_tau, tau) - sg(x0_k)|^2 ]
       SNR(tau) = ((1 - tau)/tau)^2,   w_IS = min(exp(-mean xi^2 / 2) / exp(-mean z^2 / 2), is_clip)

5. Generator loss (grads only into G; teacher and fake score under no_grad; the teacher with Krea's
   CFG at ``guidance`` g, ``x0_cfg = x0_c + g (x0_c - x0_u)`` with the empty prompt as ``u``, the
   fake score without CFG)::

       target = sg(x0_k + x0_cfg - x0_fake)
       d      = max(sg(mean|x0_k - x0_cfg|), min_normaliser)                   (per sample)
       L_G    = mean_b[ mean(sqrt((x0_k - target)^2 + c^2) - c) / d ]

   so G moves along ``x0_cfg - x0_fake`` (DMD's reverse-KL direction on the student's trajectory
   marginal inside the step's interval).

The two losses are two update phases of one trainer step (``update_phases``), TDM's 1:1 order
with the fake score first: the fake-score loss, its backward and an optimizer step that moves the
fake score only; then the generator loss at the same point (same rollout and draws), against the
updated fake score, and a step that moves the student only. The fake score learns
``fake_lr_scale`` times faster (``lr_scales``; TDM demo: ``lr_G = lr_fake / 5``), and its
gradients are clipped apart from the student's, as two optimizers would.

All step math is float32; randomness is keyed by (seed, purpose, step, slot).

Sharding: the fake score is a whole Krea2DiT under ``model.auxiliary``; with more than one rank
``parallelize_dit`` makes it its own FSDP2 unit (blocks first), so it can be called outside the
student's forward (on one rank it gets its own autocast hooks instead). The
student (the FSDP root) runs first in each phase (the rollout, then the generator's forward), as
FSDP2's lazy initialisation requires. Every rank runs the same forwards whatever its samples (the
fake-score phase: the whole rollout, one student and one fake-score forward; the generator phase:
one student, one fake-score and one batched CFG teacher forward, the empty prompt padded to the
prompts' text length), so the FSDP collectives match across ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from krea2_train.config.schema import RunConfig, TdmConfig
from krea2_train.devices import to_device
from krea2_train.flow.sampler import SamplerSettings, guided_velocity, texts_at_one_length
from krea2_train.flow.timesteps import broadcast_times, inference_sigmas, interpolate
from krea2_train.model.dit import AUXILIARY_PREFIX
from krea2_train.stages.base import StageConfigError, StepContext, frozen_copy_of_initial

# Purposes of keyed randomness (distinct from NOISE, TIMESTEP, CAPTION_DROPOUT in stages.base).
ROLLOUT_NOISE, STEP_INDEX, INTERMEDIATE_TIME, TARGET_TIME, TRANSITION_NOISE = 30, 31, 32, 33, 34

FAKE_SCORE_KEY = "tdm_fake_score"
FAKE_SCORE_PREFIX = f"{AUXILIARY_PREFIX}{FAKE_SCORE_KEY}."

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x [B, ...], sigma [B]) -> velocity [B, ...]


# ---------------------------------------------------------------------------------------------
# The student's step grid and per-step times
# ---------------------------------------------------------------------------------------------


def check_step_grid(sigmas: torch.Tensor) -> None:
    """A student grid must start at pure noise (sigma 1), end at 0 and strictly decrease."""
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError(f"a step grid needs at least 2 sigmas in a 1-d tensor, got shape {tuple(sigmas.shape)}")
    if float(sigmas[0]) != 1.0:
        raise ValueError(f"a step grid must start at the terminal sigma 1 (pure noise), got {float(sigmas[0])}")
    if float(sigmas[-1]) != 0.0:
        raise ValueError(f"a step grid must end at sigma 0, got {float(sigmas[-1])}")
    if not bool((sigmas[1:] < sigmas[:-1]).all()):
        raise ValueError(f"a step grid's sigmas must strictly decrease, got {sigmas.tolist()}")


def student_sampler(tdm: TdmConfig) -> SamplerSettings:
    """The student's sampler: ``student_steps`` Euler steps shifted by ``tdm.mu``, no guidance
    (the CFG is baked in). Its sample grids and ``krea2 sample`` of a TDM run use it."""
    return SamplerSettings(num_steps=int(tdm.student_steps), guidance_scale=0.0, mu=float(tdm.mu))


def student_sigmas(num_steps: int, mu: float) -> torch.Tensor:
    """The student's K-step grid ``[K + 1]`` float32, 1 -> 0: the Turbo sampler's shifted sigmas
    (``inference_sigmas(K, mu)``), so the student trains on the grid it is sampled on."""
    sigmas = inference_sigmas(num_steps, mu)
    check_step_grid(sigmas)
    return sigmas


def check_step_intervals(sigmas: torch.Tensor, min_sigma: float, margin: float) -> None:
    """Every step ``k`` must leave room for ``s`` and ``tau``: ``max(sigma_{k+1}, min_sigma) < sigma_k - margin``."""
    for k in range(sigmas.numel() - 1):
        high, low = float(sigmas[k]), max(float(sigmas[k + 1]), min_sigma)
        if not low < high - margin:
            raise ValueError(
                f"step {k} of the student grid ({float(sigmas[k]):.4f} -> {float(sigmas[k + 1]):.4f}) leaves no room for tau "
                f"with tdm.min_sigma={min_sigma} and tdm.interval_margin={margin}: use fewer tdm.student_steps or smaller values"
            )


def sample_step_times(
    sigmas: torch.Tensor,
    step: torch.Tensor,
    u_intermediate: torch.Tensor,
    u_target: torch.Tensor,
    *,
    use_separate: bool = True,
    use_randmid: bool = False,
    min_sigma: float = 0.02,
    margin: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The intermediate ``s`` and target ``tau`` of each sample's step, from uniforms in [0, 1).

    Step ``k`` covers ``(sigma_{k+1}, sigma_k]``. ``s`` is ``max(sigma_{k+1}, min_sigma)`` (or,
    with ``use_randmid``, uniform between that and ``sigma_k - margin``); ``tau`` is uniform in
    ``[s, sigma_k - margin]`` (``use_separate``) or ``[s, 1 - margin]``.

    Args:
        sigmas: the grid ``[K + 1]``; step ``[B]`` long in ``[0, K)``; u_* ``[B]`` in [0, 1).
    Returns:
        ``s`` and ``tau``, each ``[B]`` float32 with ``s <= tau``.
    """
    sigmas = sigmas.float()
    high = sigmas[step]
    low = sigmas[step + 1].clamp_min(min_sigma)
    top = high - margin
    s = low + u_intermediate.float() * (top - low) if use_randmid else low
    ceiling = top if use_separate else torch.full_like(top, 1.0 - margin)
    tau = s + u_target.float() * (ceiling - s)
    return s, tau


# ---------------------------------------------------------------------------------------------
# Flow transition, weights and losses (pure functions of plain tensors)
# ---------------------------------------------------------------------------------------------


def x0_from_velocity(x: torch.Tensor, velocity: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``x0_hat = x - sigma v`` (float32); sigma ``[B]``."""
    return x.float() - broadcast_times(sigma, x.float()) * velocity.float()


def eps_from_velocity(x: torch.Tensor, velocity: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``eps_hat = x + (1 - sigma) v`` (float32); sigma ``[B]``."""
    return x.float() + (1 - broadcast_times(sigma, x.float())) * velocity.float()


def effective_noise(x_sigma: torch.Tensor, x0_hat: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The noise of ``x_sigma`` relative to ``x0_hat``: ``(x_sigma - (1 - sigma) x0_hat) / sigma``."""
    sigma = broadcast_times(sigma, x_sigma.float())
    return (x_sigma.float() - (1 - sigma) * x0_hat.float()) / sigma


def flow_transition(
    x_from: torch.Tensor, eps_hat: torch.Tensor, sigma_from: torch.Tensor, sigma_to: torch.Tensor, z: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward-diffuse ``x_{sigma1}`` to the noisier ``sigma2 >= sigma1``, and its mixed noise.

    ``a = (1 - sigma2) / (1 - sigma1)``, ``beta^2 = sigma2^2 - (a sigma1)^2``,
    ``x_{sigma2} = a x_{sigma1} + beta z``, ``xi = (a sigma1 eps_hat + beta z) / sigma2``
    (with the ``sigma1`` factor: TDM's post-2025-10-20 ``obtain_mixed_noise``). When
    ``x_{sigma1} = (1 - sigma1) x0_hat + sigma1 eps_hat`` then ``x_{sigma2} = (1 - sigma2) x0_hat + sigma2 xi``.

    Args:
        x_from, eps_hat, z: ``[B, ...]``; sigma_from, sigma_to: ``[B]`` with ``sigma_from < 1``.
    Returns:
        ``(x_{sigma2}, xi)``, float32 ``[B, ...]``.
    """
    s1, s2 = broadcast_times(sigma_from, x_from.float()), broadcast_times(sigma_to, x_from.float())
    a = (1 - s2) / (1 - s1)
    beta = (s2.square() - (a * s1).square()).clamp_min(0).sqrt()
    x_to = a * x_from.float() + beta * z.float()
    xi = (a * s1 * eps_hat.float() + beta * z.float()) / s2
    return x_to, xi


def snr_weight(sigma: torch.Tensor, clip: float) -> torch.Tensor:
    """``min(((1 - sigma) / sigma)^2, clip)`` ``[B]``."""
    sigma = sigma.float()
    return ((1 - sigma) / sigma).square().clamp_max(clip)


def importance_weight(xi: torch.Tensor, z: torch.Tensor, clip: float) -> torch.Tensor:
    """``min(exp(-mean xi^2 / 2) / exp(-mean z^2 / 2), clip)`` per sample ``[B]`` (means over all
    non-batch dims: TDM's tempered density ratio N(xi)/N(z), corrects for eps_hat not being N(0, I))."""
    mean_xi = xi.float().flatten(1).square().mean(1)
    mean_z = z.float().flatten(1).square().mean(1)
    return torch.exp(-0.5 * (mean_xi - mean_z)).clamp_max(clip)


def fake_score_loss(x0_fake: torch.Tensor, x0_student: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``mean_b[weight_b mean|x0_fake - sg(x0_student)|^2]``: the fake score denoises the student's samples."""
    squared = (x0_fake.float() - x0_student.detach().float()).square().flatten(1).mean(1)
    return (weight.detach() * squared).mean()


def generator_loss(
    x0_student: torch.Tensor,
    x0_cfg: torch.Tensor,
    x0_fake: torch.Tensor,
    huber_c: float,
    min_normaliser: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """TDM's generator loss; its gradient moves ``x0_student`` along ``x0_cfg - x0_fake``.

    ``target = sg(x0_k + x0_cfg - x0_fake)``, ``d = max(sg(mean|x0_k - x0_cfg|), min_normaliser)``
    per sample (NaN mapped to ``min_normaliser``), loss ``mean_b[mean(sqrt((x0_k - target)^2 + c^2) - c) / d]``.

    Returns:
        (scalar loss, normaliser ``d`` ``[B]``).
    """
    x0_student = x0_student.float()
    x0_cfg, x0_fake = x0_cfg.detach().float(), x0_fake.detach().float()
    # x0_k - target, written so that it is exactly 0 when x0_cfg == x0_fake (rounding of
    # (x0_k + x0_cfg) - x0_fake would leave a spurious gradient at equilibrium)
    residual = (x0_student - x0_student.detach()) - (x0_cfg - x0_fake)
    distance = (x0_student.detach() - x0_cfg).abs().flatten(1).mean(1)
    normaliser = torch.nan_to_num(distance, nan=min_normaliser, posinf=min_normaliser).clamp_min(min_normaliser)
    huber = (residual.square() + huber_c**2).sqrt() - huber_c
    return (huber.flatten(1).mean(1) / normaliser).mean(), normaliser


# ---------------------------------------------------------------------------------------------
# Rollout and the whole objective on velocity callables
# ---------------------------------------------------------------------------------------------


def rollout_states(student: VelocityFn, noise: torch.Tensor, sigmas: torch.Tensor, num_steps: int | None = None) -> torch.Tensor:
    """The student's deterministic rollout from ``noise`` at sigma 1: the input of each step.

    ``x_{k+1} = (1 - sigma_{k+1}) x0_hat_k + sigma_{k+1} eps_hat_k`` with the student's own
    prediction at ``(x_k, sigma_k)`` (DDIM-like; equal to the Euler step of a flow model). Call it
    under ``torch.no_grad()``.

    Args:
        student: ``(x [B, ...], sigma [B]) -> velocity``; noise ``[B, ...]``; sigmas the grid ``[K + 1]``.
        num_steps: how many step inputs to return (default K; fewer saves the later steps).
    Returns:
        ``[num_steps, B, ...]`` float32: ``x_0 = noise, x_1, ...``.
    """
    num_steps = sigmas.numel() - 1 if num_steps is None else num_steps
    batch = noise.shape[0]
    x = noise.float()
    states = [x]
    for k in range(num_steps - 1):
        sigma = sigmas[k].expand(batch)
        velocity = student(x, sigma).float()
        x0_hat, eps_hat = x0_from_velocity(x, velocity, sigma), eps_from_velocity(x, velocity, sigma)
        x = interpolate(x0_hat, eps_hat, sigmas[k + 1])
        states.append(x)
    return torch.stack(states)


@dataclass
class TdmPoint:
    """Where a step's two losses are evaluated (no grad): the student's re-noised sample ``x_tau``
    ``[B, ...]`` at ``tau`` ``[B]``, and its importance weight ``[B]``."""

    x_tau: torch.Tensor
    tau: torch.Tensor
    importance: torch.Tensor


def fake_score_objective(
    student: VelocityFn,
    fake_score: VelocityFn,
    x_k: torch.Tensor,
    sigma_k: torch.Tensor,
    s: torch.Tensor,
    tau: torch.Tensor,
    z: torch.Tensor,
    *,
    snr_clip: float = 5.0,
    is_clip: float = 10.0,
) -> tuple[torch.Tensor, TdmPoint]:
    """The fake-score loss at the step inputs ``x_k`` (module docstring, 2-4), with grad into
    ``fake_score`` only (the student runs under no_grad), and the point it was evaluated at, where
    the generator's loss is evaluated next.

    Args:
        x_k: ``[B, ...]`` step inputs from the rollout; sigma_k, s, tau ``[B]``; z ``[B, ...]`` N(0, I).
    """
    with torch.no_grad():
        x0_k = x0_from_velocity(x_k, student(x_k, sigma_k), sigma_k)
        eps_hat = effective_noise(x_k, x0_k, sigma_k)
        x_tau, xi = flow_transition(interpolate(x0_k, eps_hat, s), eps_hat, s, tau, z)
        importance = importance_weight(xi, z, is_clip)
        weight = snr_weight(tau, snr_clip) * importance
    x0_fake = x0_from_velocity(x_tau, fake_score(x_tau, tau), tau)
    return fake_score_loss(x0_fake, x0_k, weight), TdmPoint(x_tau, tau, importance)


def generator_objective(
    student: VelocityFn,
    fake_score: VelocityFn,
    teacher_cfg: VelocityFn,
    x_k: torch.Tensor,
    sigma_k: torch.Tensor,
    point: TdmPoint,
    *,
    huber_c: float = 1e-3,
    min_normaliser: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The generator loss (module docstring, 5) at ``point``, with grad into ``student`` only;
    ``fake_score`` (as updated by its own loss first) and the guided ``teacher_cfg`` run under
    no_grad. Returns the loss and the per-sample normaliser ``[B]``."""
    x0_k = x0_from_velocity(x_k, student(x_k, sigma_k), sigma_k)
    with torch.no_grad():
        x0_fake = x0_from_velocity(point.x_tau, fake_score(point.x_tau, point.tau), point.tau)
        x0_cfg = x0_from_velocity(point.x_tau, teacher_cfg(point.x_tau, point.tau), point.tau)
    return generator_loss(x0_k, x0_cfg, x0_fake, huber_c, min_normaliser)


# ---------------------------------------------------------------------------------------------
# The stage: DiT plumbing
# ---------------------------------------------------------------------------------------------


def check_tdm_config(config: RunConfig) -> None:
    """Refuse values that cannot train, naming the key."""
    tdm: TdmConfig = config.tdm
    if config.stage.init_from is None:
        raise StageConfigError(
            f"stage {config.stage.name!r} (kind tdm) needs stage.init_from: the teacher's weights (a run, checkpoint or weights file)"
        )
    if config.parallel.tp != 1:
        raise StageConfigError(f"the tdm stage does not support tensor parallelism (parallel.tp={config.parallel.tp}); use parallel.tp=1")
    checks = [
        ("tdm.student_steps", tdm.student_steps >= 1, "must be at least 1"),
        ("tdm.guidance", tdm.guidance >= 0, "must be >= 0 (Krea's g; 0: no CFG)"),
        ("tdm.fake_lr_scale", tdm.fake_lr_scale > 0, "must be positive"),
        ("tdm.snr_clip", tdm.snr_clip > 0, "must be positive"),
        ("tdm.is_clip", tdm.is_clip > 0, "must be positive"),
        ("tdm.huber_c", tdm.huber_c > 0, "must be positive"),
        ("tdm.min_sigma", 0 < tdm.min_sigma < 1, "must be in (0, 1)"),
        ("tdm.interval_margin", 0 <= tdm.interval_margin < 1, "must be in [0, 1)"),
        ("tdm.min_normaliser", tdm.min_normaliser > 0, "must be positive"),
    ]
    for key, ok, requirement in checks:
        if not ok:
            raise StageConfigError(f"{key}={getattr(tdm, key.split('.')[1])} {requirement}")


@dataclass
class TdmInputs:
    """One micro-batch's networks (as velocity functions on its conditioning) and step inputs:
    ``x_k`` ``[B, ...]`` from the rollout, ``sigma_k``, ``s``, ``tau`` ``[B]``, ``z`` ``[B, ...]``."""

    student: VelocityFn
    fake_score: VelocityFn
    teacher: VelocityFn
    x_k: torch.Tensor
    sigma_k: torch.Tensor
    s: torch.Tensor
    tau: torch.Tensor
    z: torch.Tensor


class TdmStage:
    def __init__(self, config: RunConfig) -> None:
        check_tdm_config(config)
        self.name = config.stage.name
        self.config = config
        self.tdm = config.tdm
        self.sigmas = student_sigmas(self.tdm.student_steps, self.tdm.mu)
        check_step_intervals(self.sigmas, self.tdm.min_sigma, self.tdm.interval_margin)
        self.lr_scales = {FAKE_SCORE_PREFIX: self.tdm.fake_lr_scale}
        self.update_phases = ("fake_score", "generator")  # TDM's order: the fake score first
        self.pending: dict[int, tuple[TdmInputs, TdmPoint]] = {}  # micro-batch -> its fake-score phase's inputs and point

    def sample_settings(self, num_image_tokens: int) -> SamplerSettings:
        """Sample grids show the student on its own grid (:func:`student_sampler`); ``logging.sample_*`` do not apply."""
        return student_sampler(self.tdm)

    # -- networks ---------------------------------------------------------------------------------

    def frozen_models(self, initial_weights: dict[str, torch.Tensor] | None) -> dict[str, torch.nn.Module]:
        """The teacher: ``stage.init_from``'s weights in the run's model config."""
        return {"teacher": frozen_copy_of_initial(self.config, initial_weights)}

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """Attach the fake score, a copy of the model (the student holds the teacher's weights on a
        fresh start; a resumed run loads both from the checkpoint), under ``model.auxiliary``."""
        from krea2_train.model.presets import build_model

        fake_score = build_model(self.config.model.preset, **self.config.model.overrides)
        weights = {key: value for key, value in model.state_dict().items() if not key.startswith(AUXILIARY_PREFIX)}
        fake_score.load_state_dict(weights, strict=True)
        model.auxiliary[FAKE_SCORE_KEY] = fake_score
        return model

    # -- the loss ---------------------------------------------------------------------------------

    def draws(self, ctx: StepContext, batch_size: int, shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
        """Keyed per-sample randomness on the host: rollout noise and transition noise ``[B, *shape]``,
        step index ``[B]`` long, uniforms for ``s`` and ``tau`` ``[B]``."""
        slots = ctx.slots(batch_size)
        num_steps = self.tdm.student_steps
        return dict(
            noise=torch.stack([torch.randn(shape, generator=ctx.generator(ROLLOUT_NOISE, slot)) for slot in slots]),
            z=torch.stack([torch.randn(shape, generator=ctx.generator(TRANSITION_NOISE, slot)) for slot in slots]),
            step=torch.cat([torch.randint(num_steps, (1,), generator=ctx.generator(STEP_INDEX, slot)) for slot in slots]),
            u_intermediate=torch.tensor([ctx.uniform(INTERMEDIATE_TIME, slot) for slot in slots], dtype=torch.float32),
            u_target=torch.tensor([ctx.uniform(TARGET_TIME, slot) for slot in slots], dtype=torch.float32),
        )

    def loss(self, ctx: StepContext, batch: dict[str, Any], phase: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``phase`` "fake_score": roll out, draw the step's point, and the fake score's loss;
        "generator" (after the trainer stepped the fake score): the student's loss at the same
        point, against the updated fake score. The first phase keeps what the second needs."""
        if phase == "fake_score":
            inputs = self.step_inputs(ctx, batch)
            loss_fake, point = fake_score_objective(
                inputs.student, inputs.fake_score, inputs.x_k, inputs.sigma_k, inputs.s, inputs.tau, inputs.z,
                snr_clip=self.tdm.snr_clip, is_clip=self.tdm.is_clip,
            )
            self.pending[ctx.micro_index] = (inputs, point)
            return loss_fake, {
                "loss_fake": loss_fake.detach(),
                "w_is_min": point.importance.min(),
                "w_is_mean": point.importance.mean(),
                "w_is_max": point.importance.max(),
                "tau_mean": point.tau.mean(),
            }
        inputs, point = self.pending.pop(ctx.micro_index)
        loss_generator, normaliser = generator_objective(
            inputs.student, inputs.fake_score, inputs.teacher, inputs.x_k, inputs.sigma_k, point,
            huber_c=self.tdm.huber_c, min_normaliser=self.tdm.min_normaliser,
        )
        return loss_generator, {"loss_generator": loss_generator.detach(), "normaliser_mean": normaliser.mean()}

    def step_inputs(self, ctx: StepContext, batch: dict[str, Any]) -> TdmInputs:
        """The step's conditioning, draws and rollout (the rollout without grad, on every rank)."""
        captions = list(batch["captions"])
        batch_size = len(captions)
        grid = ctx.conditioner.grid(*batch["images"].shape[-2:])  # the image size only: data-free
        channels = ctx.conditioner.autoencoder.latent_channels * ctx.conditioner.patch_size**2
        text_states, text_mask = ctx.conditioner.encode_text(captions)
        empty_states, empty_mask = ctx.conditioner.encode_text([""])
        (text_states, text_mask), (empty_states, empty_mask) = texts_at_one_length(
            (text_states, text_mask), (empty_states, empty_mask)
        )
        text_states, text_mask = text_states.to(ctx.device, ctx.dtype), text_mask.to(ctx.device)
        empty_states, empty_mask = empty_states.to(ctx.device, ctx.dtype), empty_mask.to(ctx.device)

        draws = self.draws(ctx, batch_size, (grid.num_tokens, channels))
        step = draws["step"]
        s, tau = sample_step_times(
            self.sigmas, step, draws["u_intermediate"], draws["u_target"], use_separate=self.tdm.use_separate,
            use_randmid=self.tdm.use_randmid, min_sigma=self.tdm.min_sigma, margin=self.tdm.interval_margin,
        )
        sigma_k = self.sigmas[step]
        noise, z, s, tau, sigma_k, step_device, sigmas = (
            to_device(t, ctx.device) for t in (draws["noise"], draws["z"], s, tau, sigma_k, step, self.sigmas)
        )

        def velocity_of(network: torch.nn.Module, guidance: float = 0.0) -> VelocityFn:
            def velocity(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
                return guided_velocity(
                    network, x.to(ctx.dtype), sigma, text_states, text_mask, grid.height, grid.width,
                    guidance_scale=guidance, negative_text_states=empty_states, negative_text_mask=empty_mask,
                ).float()

            return velocity

        student = velocity_of(ctx.model)  # the FSDP root: it runs forward first (FSDP2's lazy init)
        with torch.no_grad():  # every step, on every rank: the FSDP collectives must match across ranks
            states = rollout_states(student, noise, sigmas)
        return TdmInputs(
            student=student,
            fake_score=velocity_of(ctx.model.auxiliary[FAKE_SCORE_KEY]),
            teacher=velocity_of(ctx.frozen["teacher"], self.tdm.guidance),
            x_k=states[step_device, torch.arange(batch_size, device=ctx.device)],
            sigma_k=sigma_k, s=s, tau=tau, z=z,
        )
