"""The GRPO stage (krea2_train.stages.grpo).

- Pure math: the clipped surrogate's golden values and where its gradient vanishes.
- Toy RL on the 8-mode ring GMM (algorithms.md 3e): a small MLP velocity conditioned on the mode
  id, regressed onto the exact velocity of a label-noisy conditional mixture (the prompted mode
  holds 9/16 of the mass), then GRPO with the stage's own pieces (SDE rollout, log-probs,
  advantages, clipped loss): the hit rate of the prompted mode rises within 30 rollouts.
- The stage on the tiny DiT with the real conditioner: the first update of a rollout has ratio 1
  exactly, the next re-uses the buffer (ratio != 1, clipping active), state_dict resumes exactly.
- End to end (slow): a short pretrain, then the grpo stage in the trainer; metrics logged and
  finite; a run killed mid-buffer and resumed reproduces the uninterrupted one.
"""

import copy
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gmm_oracle import GaussianMixture
from helpers import random_tiny_model

from krea2_train.config import load_config
from krea2_train.data import shapes
from krea2_train.flow.sde import policy_kl, rollout, sde_step_mean_std, step_log_prob
from krea2_train.rewards.advantages import aggregate_advantages
from krea2_train.stages import build_stage
from krea2_train.stages.base import StepContext
from krea2_train.stages.grpo import GrpoStage, clipped_policy_loss

# ------------------------------------------------------------------------------------------------
# pure math


def test_clipped_surrogate_golden_values_and_gradients():
    ratio = torch.tensor([1.0, 1.5, 0.5, 1.5, 0.5, 1.00005], requires_grad=True)
    advantages = torch.tensor([2.0, 1.0, 1.0, -1.0, -1.0, 1.0])
    loss = clipped_policy_loss(ratio, advantages, 0.2)
    # max(-A rho, -A clip(rho)): A > 0 caps the gain at 1 + eps, A < 0 caps it at 1 - eps
    torch.testing.assert_close(loss.detach(), torch.tensor([-2.0, -1.2, -0.5, 1.5, 0.8, -1.00005]))
    loss.sum().backward()
    # clipped where the ratio already moved past the trust region in the advantage's direction
    torch.testing.assert_close(ratio.grad, torch.tensor([-2.0, 0.0, -1.0, 1.0, 0.0, -1.0]))


# ------------------------------------------------------------------------------------------------
# toy RL on the GMM

MODES = 8
RING = GaussianMixture.ring(MODES, radius=2.0, std=0.15)


def label_noisy_mixture(mode: int, keep: float = 0.5) -> GaussianMixture:
    """What a model trained with half its labels replaced at random generates for ``mode``."""
    weights = torch.full((MODES,), (1 - keep) / MODES, dtype=torch.float64)
    weights[mode] += keep
    return GaussianMixture(weights, RING.means, RING.stds)


class ModeVelocity(torch.nn.Module):
    def __init__(self, width: int = 128) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(MODES, 32)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(2 + 2 + 32, width), torch.nn.SiLU(), torch.nn.Linear(width, width), torch.nn.SiLU(),
            torch.nn.Linear(width, 2),
        )

    def forward(self, x: torch.Tensor, t: torch.Tensor, mode: torch.Tensor) -> torch.Tensor:
        t = t.expand(x.shape[0]).reshape(-1, 1)
        return self.net(torch.cat([x, torch.sin(3 * t), torch.cos(3 * t), self.embed(mode)], dim=1))


def regress_base(steps: int = 350, per_mode: int = 32, seed: int = 0) -> ModeVelocity:
    """Regress the MLP onto the exact velocity of each mode's label-noisy mixture."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    mixtures = [label_noisy_mixture(k) for k in range(MODES)]
    model = ModeVelocity()
    optimizer = torch.optim.Adam(model.parameters(), 5e-3)
    mode = torch.arange(MODES).repeat_interleave(per_mode)
    for _ in range(steps):
        t = torch.rand(mode.shape[0], generator=generator) * 0.999 + 0.001
        x0 = torch.cat([m.sample(per_mode, generator) for m in mixtures])
        x_t = (1 - t[:, None].double()) * x0 + t[:, None].double() * torch.randn(x0.shape, generator=generator, dtype=torch.float64)
        parts = [slice(k * per_mode, (k + 1) * per_mode) for k in range(MODES)]
        target = torch.cat([m.velocity(x_t[p], t[p]) for m, p in zip(mixtures, parts)]).float()
        loss = (model(x_t.float(), t, mode) - target).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


def mode_reward(x: torch.Tensor, mode: torch.Tensor) -> torch.Tensor:
    """1 for a sample nearest its prompted mode, minus a small distance term."""
    distances = torch.cdist(x.double(), RING.means)
    return (distances.argmin(1) == mode).double() - 0.05 * distances[torch.arange(mode.shape[0]), mode]


def ode_hit_rate(model: ModeVelocity, n: int = 1024) -> float:
    generator = torch.Generator().manual_seed(123)
    mode = torch.arange(n) % MODES
    with torch.no_grad():
        final = rollout(lambda x, t: model(x, t, mode), torch.randn(n, 2, generator=generator), torch.linspace(1, 0, 11), [],
                        generator, noise_level=0.0).final
    return (torch.cdist(final.double(), RING.means).argmin(1) == mode).double().mean().item()


def toy_grpo(model, reference, *, rollouts=30, updates=2, group=16, lr=3e-3, clip=1e-4, noise_level=0.7, beta_kl=0.0):
    """GRPO on the toy with the stage's pieces; returns per-rollout mean reward, KL and first-update ratios."""
    optimizer = torch.optim.Adam(model.parameters(), lr)
    sigmas = torch.linspace(1.0, 0.0, 11)
    mode = torch.arange(MODES).repeat_interleave(group)
    size = mode.shape[0]
    history = {"reward": [], "kl": [], "first_ratio": [], "clip_fraction": []}
    for index in range(rollouts):
        generator = torch.Generator().manual_seed(1000 + index)
        with torch.no_grad():
            sampled = rollout(lambda x, t: model(x, t, mode), torch.randn(size, 2, generator=generator), sigmas, range(9),
                              generator, noise_level=noise_level)
        rewards = mode_reward(sampled.final, mode)
        result = aggregate_advantages({"hit": rewards}, {"hit": 1.0}, group, aggregation="reward_aggr")
        history["reward"].append(rewards.mean().item())
        x, x_next = torch.cat([s.x for s in sampled.steps]), torch.cat([s.x_next for s in sampled.steps])
        t = torch.cat([s.t.expand(size) for s in sampled.steps])
        t_next = torch.cat([s.t_next.expand(size) for s in sampled.steps])
        steps = len(sampled.steps)
        modes, advantages, valid = mode.repeat(steps), result.advantages.repeat(steps), result.valid.float().repeat(steps)

        def step_terms(net):
            mean, std = sde_step_mean_std(net(x, t, modes), x, t, t_next, noise_level=noise_level, t_cap=sampled.t_cap)
            return step_log_prob(x_next, mean, std), mean, std

        with torch.no_grad():
            log_prob_old = step_terms(model)[0]
            reference_mean = step_terms(reference)[1]
        for update in range(updates):
            log_prob, mean, std = step_terms(model)
            ratio = torch.exp(log_prob - log_prob_old)
            if update == 0:
                history["first_ratio"].append(ratio.detach())
            else:
                history["clip_fraction"].append(((ratio - 1).abs() > clip).float().mean().item())
            policy = (clipped_policy_loss(ratio, advantages, clip) * valid).sum() / valid.sum().clamp_min(1)
            kl = policy_kl(mean, reference_mean, std, t, t_next).mean()
            optimizer.zero_grad()
            (policy + beta_kl * kl).backward()
            optimizer.step()
        history["kl"].append(kl.item())
    return history


@pytest.fixture(scope="module")
def toy_base():
    torch.set_num_threads(1)
    return regress_base()


def test_toy_grpo_raises_the_prompted_mode_hit_rate(toy_base):
    base_rate = ode_hit_rate(toy_base)
    assert 0.45 < base_rate < 0.7  # the label-noisy mixture's 9/16 mass on the prompted mode
    policy = copy.deepcopy(toy_base)
    history = toy_grpo(policy, toy_base)
    assert all(torch.equal(r, torch.ones_like(r)) for r in history["first_ratio"])  # rho == 1 at every first update
    assert np.mean(history["clip_fraction"]) > 0.5  # clip 1e-4 binds on the second update
    assert np.mean(history["reward"][-5:]) > np.mean(history["reward"][:5]) + 0.2, history["reward"]
    assert ode_hit_rate(policy) > base_rate + 0.2

    # the KL to the base: bounded by beta_kl (reward still rises)
    anchored = copy.deepcopy(toy_base)
    anchored_history = toy_grpo(anchored, toy_base, beta_kl=5.0)  # 0.5 of the exact KL (dt = 0.1)
    assert np.mean(anchored_history["reward"][-5:]) > np.mean(anchored_history["reward"][:5]) + 0.05
    assert np.mean(anchored_history["kl"][-5:]) < np.mean(history["kl"][-5:]), (anchored_history["kl"], history["kl"])


# ------------------------------------------------------------------------------------------------
# the stage on the tiny DiT


class BrightnessReward:
    """A test reward that varies between rollouts of a random model: mean brightness in [0, 1]."""

    weights = {"brightness": 1.0}

    def __call__(self, images, facts):
        return {"brightness": ((images.float().mean(dim=(1, 2, 3)) + 1) / 2).double().numpy()}


@pytest.fixture(scope="module")
def conditioner(tmp_path_factory):
    from krea2_train.conditioning.conditioner import build_conditioner
    from krea2_train.conditioning.tiny import build_tiny_text_encoder

    directory = build_tiny_text_encoder(tmp_path_factory.mktemp("text_encoder"), seed=0)
    return build_conditioner("pixel", directory, max_text_tokens=64)


def shapes_batch(size: int, side: int = 32) -> dict:
    samples = [shapes.make_sample(index, side, seed=0) for index in range(size)]
    images = torch.stack([torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 127.5 - 1 for image, _, _ in samples])
    return {"images": images, "captions": [c["long"] for _, c, _ in samples], "facts": [f for _, _, f in samples],
            "sample_ids": torch.arange(100, 100 + size)}


def grpo_stage(*overrides) -> GrpoStage:
    config = load_config("stage/grpo", ["stage.init_from=init", "data.global_batch_size=8", "grpo.group_size=4",
                                         "grpo.num_steps=4", "grpo.sde_window_range=[0,1]", *overrides])
    stage = build_stage(config)
    stage.rewards = BrightnessReward()
    return stage


def context(model, conditioner, step, reference):
    return StepContext(model=model, conditioner=conditioner, device=torch.device("cpu"), seed=0, step=step, first_slot=0,
                       frozen={"reference": reference})


def sgd_step(model, lr=0.05):
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.grad is not None:
                parameter -= lr * parameter.grad.sign()
                parameter.grad = None


def test_first_update_has_ratio_one_and_the_buffer_is_reused_then_resumed(conditioner, one_cpu_thread):
    stage = grpo_stage("grpo.updates_per_rollout=2", "grpo.clip_range=1e-3")
    model, reference = random_tiny_model(0), random_tiny_model(0).requires_grad_(False)
    batch = shapes_batch(8)

    loss, first = stage.loss(context(model, conditioner, 0, reference), batch)
    assert first["ratio_mean"].item() == 1.0 and first["ratio_min"].item() == first["ratio_max"].item() == 1.0 and first["clip_fraction"].item() == 0.0
    assert first["ratio_mean_first_step"].item() == first["ratio_mean_last_step"].item() == 1.0
    assert first["logp_rollout_gap_max"].item() == 0.0 and first["kl"].item() < 1e-10 and first["update_index"].item() == 0
    assert first["zero_std_ratio"].item() == 0.0 and first["advantage_abs_mean"].item() > 0.1
    assert set(first) >= {"reward_mean", "reward_brightness_mean", "advantage_abs_mean", "zero_std_ratio", "ratio_mean",
                          "ratio_min", "ratio_max", "clip_fraction", "kl", "loss_policy", "prompt_weight_mean"}
    assert all(value.ndim == 0 and torch.isfinite(value) for value in first.values())
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    sgd_step(model)
    checkpoint = (stage.state_dict(), copy.deepcopy(model.state_dict()))

    loss_second, second = stage.loss(context(model, conditioner, 1, reference), batch)
    assert second["update_index"].item() == 1 and second["reward_mean"].item() == first["reward_mean"].item()
    assert second["ratio_mean_first_step"].item() != second["ratio_mean_last_step"].item()  # the window's steps apart
    assert second["ratio_max"].item() > second["ratio_min"].item() and second["clip_fraction"].item() > 0 and second["kl"].item() > 0

    # a fresh stage loaded from the checkpoint computes the same second update, bit for bit
    resumed_stage, resumed_model = grpo_stage("grpo.updates_per_rollout=2", "grpo.clip_range=1e-3"), random_tiny_model(5)
    resumed_stage.load_state_dict(checkpoint[0])
    resumed_model.load_state_dict(checkpoint[1])
    loss_resumed, resumed = resumed_stage.loss(context(resumed_model, conditioner, 1, reference), batch)
    assert torch.equal(loss_resumed, loss_second)
    assert {k: v.item() for k, v in resumed.items()} == {k: v.item() for k, v in second.items()}

    # the third step rolls out again: ratio 1 again
    _, third = stage.loss(context(model, conditioner, 2, reference), batch)
    assert third["update_index"].item() == 0 and third["ratio_mean"].item() == 1.0


def test_cps_policy_recomputes_to_ratio_one(conditioner, one_cpu_thread):
    stage = grpo_stage("grpo.sde_type=cps", "grpo.noise_level=0.8", "grpo.sde_window_range=[0,1]")
    model, reference = random_tiny_model(1), random_tiny_model(1).requires_grad_(False)
    loss, metrics = stage.loss(context(model, conditioner, 0, reference), shapes_batch(8))
    assert metrics["ratio_mean"].item() == 1.0 and metrics["ratio_min"].item() == metrics["ratio_max"].item() == 1.0 and torch.isfinite(loss)
    assert metrics["kl"].item() < 1e-10


def test_groups_share_prompts_and_same_initial_noise(conditioner, one_cpu_thread):
    model = random_tiny_model(0)
    stage = grpo_stage("grpo.same_initial_noise=true", "grpo.beta_kl=0")
    (buffer,) = stage.collect([(context(model, conditioner, 0, None), shapes_batch(8))])
    assert buffer.captions == [shapes_batch(8)["captions"][0]] * 4 + [shapes_batch(8)["captions"][4]] * 4
    assert buffer.prompt_ids == [100] * 4 + [104] * 4
    # the group's members share x_0, so (ODE steps being deterministic) the window's first state
    assert torch.equal(buffer.x[0, 0], buffer.x[0, 3]) and not torch.equal(buffer.x[0, 0], buffer.x[0, 4])
    assert not torch.equal(buffer.x_next[0, 0], buffer.x_next[0, 1])  # but not their SDE noise
    (independent,) = grpo_stage("grpo.same_initial_noise=false", "grpo.beta_kl=0").collect(
        [(context(model, conditioner, 0, None), shapes_batch(8))]
    )
    assert not torch.equal(independent.x[0, 0], independent.x[0, 3])


class OneConstantGroup(BrightnessReward):
    """Brightness, except the first prompt's group, which always scores 0.5 (a masked group)."""

    def __init__(self, first_facts):
        super().__init__()
        self.first_facts = first_facts

    def __call__(self, images, facts):
        scores = super().__call__(images, facts)["brightness"]
        return {"brightness": np.where([f == self.first_facts for f in facts], 0.5, scores)}


class ConstantBrightness(BrightnessReward):
    """Every image scores 0.5: every group is masked."""

    def __call__(self, images, facts):
        return {"brightness": np.full(len(facts), 0.5)}


def test_the_kl_term_leaves_out_masked_groups_like_the_policy_term(conditioner, one_cpu_thread):
    """Groups whose rewards are all equal train nothing: with every group constant the loss is 0
    and no gradient flows although the policy is far from the reference (KL > 0 when scored)."""
    model, reference = random_tiny_model(0), random_tiny_model(1).requires_grad_(False)
    batch = shapes_batch(8)
    scored = grpo_stage("grpo.beta_kl=1.0")
    _, metrics = scored.loss(context(model, conditioner, 0, reference), batch)
    assert metrics["kl"].item() > 1e-3 and metrics["zero_std_ratio"].item() == 0.0

    constant = grpo_stage("grpo.beta_kl=1.0")
    constant.rewards = ConstantBrightness()
    model.zero_grad(set_to_none=True)
    loss, masked = constant.loss(context(model, conditioner, 0, reference), batch)
    assert masked["zero_std_ratio"].item() == 1.0 and masked["kl"].item() == 0.0 and loss.item() == 0.0
    loss.backward()
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in model.parameters())


def test_gradient_accumulation_does_not_change_the_rollout_or_the_update(conditioner, one_cpu_thread):
    """Two micro-batches rolled out through begin_step give the advantages (global std), the
    masked-group normalisation and the gradient of one micro-batch holding the whole batch."""
    batch = shapes_batch(8)
    options = ("grpo.group_size=2", "grpo.beta_kl=0", "grpo.reweight_prompts=false")
    gradients, advantages, losses = [], [], []
    for accum in (1, 2):
        stage = grpo_stage(*options, f"optim.grad_accum_steps={accum}")
        stage.rewards = OneConstantGroup(batch["facts"][0])
        model = random_tiny_model(0)
        micro = 8 // accum
        micro_steps = [
            (StepContext(model=model, conditioner=conditioner, device=torch.device("cpu"), seed=0, step=0,
                         first_slot=index * micro, micro_index=index),
             {k: v[index * micro : (index + 1) * micro] for k, v in batch.items()})
            for index in range(accum)
        ]
        stage.begin_step(micro_steps)
        total = 0.0
        for ctx, part in micro_steps:
            loss, _ = stage.loss(ctx, part)
            (loss / accum).backward()
            total += loss.item() / accum
        gradients.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
        advantages.append(torch.cat([stage.buffers[index].advantages for index in range(accum)]))
        losses.append(total)
    assert advantages[0][:2].abs().max() == 0 and advantages[0][2:].abs().min() > 0  # the constant group is masked
    # a batch of 4 and a batch of 8 sample images that differ in the last float bits
    torch.testing.assert_close(advantages[1], advantages[0], rtol=1e-3, atol=1e-5)
    assert losses[1] == pytest.approx(losses[0], rel=1e-3, abs=1e-6)
    torch.testing.assert_close(gradients[1], gradients[0], rtol=1e-3, atol=1e-6)


def micro_steps_of(model, conditioner, batch, step, accum):
    micro = len(batch["captions"]) // accum
    return [(StepContext(model=model, conditioner=conditioner, device=torch.device("cpu"), seed=0, step=step,
                         first_slot=index * micro, micro_index=index),
             {k: v[index * micro : (index + 1) * micro] for k, v in batch.items()})
            for index in range(accum)]


@pytest.mark.parametrize("saved_accum, resumed_accum", [(1, 2), (2, 1)])
def test_a_restart_with_other_micro_batches_reuses_the_rollout(conditioner, one_cpu_thread, saved_accum, resumed_accum):
    """A checkpoint between two updates of one rollout, resumed with another accumulation (as on
    another world size: the micro-batches hold other slots), re-assembles every micro-batch's
    buffer from the slots it is given instead of rolling out again."""
    options = ("grpo.group_size=2", "grpo.beta_kl=0", "grpo.updates_per_rollout=2")
    batch, model = shapes_batch(8), random_tiny_model(0)
    saved = grpo_stage(*options, f"optim.grad_accum_steps={saved_accum}")
    saved.begin_step(micro_steps_of(model, conditioner, batch, 0, saved_accum))
    advantages = torch.cat([saved.buffers[index].advantages for index in range(saved_accum)])
    checkpoint = saved.state_dict()

    resumed = grpo_stage(*options, f"optim.grad_accum_steps={resumed_accum}")
    resumed.load_state_dict(checkpoint)
    resumed.rewards = None  # a new rollout would need the reward models
    micro_steps = micro_steps_of(model, conditioner, batch, 1, resumed_accum)
    resumed.begin_step(micro_steps)
    for ctx, part in micro_steps:
        assert resumed.loss(ctx, part)[1]["update_index"].item() == 1
    torch.testing.assert_close(torch.cat([resumed.buffers[index].advantages for index in range(resumed_accum)]), advantages)
    assert resumed._restored == {} and len(torch.load(io.BytesIO(resumed.state_dict()["blob"]))["rollouts"]) == 8
    # after a load the ranks decide together: a rank whose slots all restored still rolls out when
    # another rank's did not (the rollout is collective)
    import krea2_train.stages.grpo as grpo_module

    agreeing = grpo_stage(*options, f"optim.grad_accum_steps={resumed_accum}")
    agreeing.load_state_dict(checkpoint)
    agreeing.rewards = BrightnessReward()
    original_gather = grpo_module.all_gather_objects
    grpo_module.all_gather_objects = lambda value: [value, True] if isinstance(value, bool) else original_gather(value)
    try:
        agreeing.begin_step(micro_steps_of(model, conditioner, batch, 1, resumed_accum))
    finally:
        grpo_module.all_gather_objects = original_gather
    assert {buffer.rollout_step for buffer in agreeing.buffers.values()} == {1}  # rolled out at step 1, with the others
    older = torch.load(io.BytesIO(checkpoint["blob"]))  # a checkpoint written before slots keyed the records
    older["rollouts"] = {0: older["rollouts"]}
    payload = io.BytesIO()
    torch.save(older, payload)
    resumed.load_state_dict({"blob": payload.getvalue()})
    assert sorted(resumed._restored) == list(range(8))


def test_the_loss_weights_each_sample_by_its_prompt_weight(conditioner, one_cpu_thread):
    """The policy gradient is linear in the prompt weights: a prompt weighted 0 contributes
    nothing, and the halves' gradients add up to the whole batch's (with the weights dropped,
    each half would give the whole batch's gradient)."""
    stage = grpo_stage("grpo.beta_kl=0")
    model, batch = random_tiny_model(0), shapes_batch(8)
    ctx = context(model, conditioner, 0, None)
    stage.begin_step([(ctx, batch)])
    buffer = stage.buffers[0]
    assert buffer.valid.all()

    def gradient(weights):
        buffer.prompt_weights = torch.tensor(weights)
        model.zero_grad()
        loss, _ = stage.loss(ctx, batch)
        loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    whole = gradient([1.0] * 8)
    first, second = gradient([1.0] * 4 + [0.0] * 4), gradient([0.0] * 4 + [1.0] * 4)
    assert first.abs().max() > 0 and second.abs().max() > 0
    torch.testing.assert_close(first + second, whole, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(gradient([0.5] * 4 + [2.0] * 4), 0.5 * first + 2.0 * second, rtol=1e-4, atol=1e-7)


def test_frozen_reference_and_config_errors():
    weights = random_tiny_model(3).state_dict()
    stage = build_stage(load_config("stage/grpo", ["stage.init_from=init", "data.global_batch_size=16"]))
    reference = stage.frozen_models(weights)["reference"]
    assert all(torch.equal(reference.state_dict()[k], v) for k, v in weights.items())
    assert build_stage(load_config("stage/grpo", ["grpo.beta_kl=0", "stage.init_from=null"])).frozen_models(None) == {}

    def error(*overrides):
        with pytest.raises(ValueError) as raised:
            build_stage(load_config("stage/grpo", ["stage.init_from=init", *overrides]))
        return str(raised.value)

    assert "grpo.group_size" in error("data.global_batch_size=12")
    assert "grpo.group_size" in error("grpo.group_size=1")
    assert "grpo.sde_type" in error("grpo.sde_type=ode")
    assert "grpo.clip_range" in error("grpo.clip_range=0")
    assert "grpo.sde_window" in error("grpo.sde_window_size=4", "grpo.sde_window_range=[0,8]")
    assert "grpo.updates_per_rollout" in error("grpo.updates_per_rollout=0")
    assert "grpo.aggregation" in error("grpo.aggregation=sum")
    assert "grpo.rewards" in error("grpo.rewards={aesthetic: 1.0}")
    assert "grpo.noise_level" in error("grpo.sde_type=cps", "grpo.noise_level=1.5")
    assert "grpo.noise_level" in error("grpo.noise_level=0")
    assert "parallel.tp" in error("parallel.tp=2")
    assert "float8.enabled is not supported with grpo.beta_kl > 0" in error("float8.enabled=true")
    build_stage(load_config("stage/grpo", ["stage.init_from=init", "grpo.beta_kl=0", "float8.enabled=true"]))  # no reference: allowed
    for sde_type in ("sde", "cps"):  # a window reaching the step to t = 0 (steps 8-9 of 10)
        assert "last step" in error(f"grpo.sde_type={sde_type}", "grpo.noise_level=0.8", "grpo.sde_window_range=[0,8]")
    assert "stage.init_from" in error("stage.init_from=null")


def test_micro_batches_must_hold_whole_groups(conditioner):
    stage = grpo_stage()
    batch = shapes_batch(6)
    with pytest.raises(ValueError, match="groups of grpo.group_size=4"):
        stage.loss(context(random_tiny_model(0), conditioner, 0, None), batch)


@pytest.mark.slow
def test_one_and_two_ranks_compute_the_same_update(tmp_path):
    """The masked-group count that normalises the loss is the global batch's: with the constant
    group on rank 0 only, per-rank counts (2 vs 4 valid samples) gave a different update."""
    from krea2_train.conditioning.tiny import build_tiny_text_encoder

    text_encoder = build_tiny_text_encoder(tmp_path / "text_encoder", seed=0)
    script = Path(__file__).parent / "distributed" / "grpo_ranks.py"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")} | {"OMP_NUM_THREADS": "1"}
    results = []
    for nproc in (1, 2):
        out = tmp_path / f"ranks-{nproc}.pt"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(script),
                   "--text-encoder", str(text_encoder), "--out", str(out)]
        completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        assert completed.returncode == 0, completed.stderr[-4000:]
        results.append(torch.load(out))
    one, two = results
    assert one["advantages"][:2].abs().max() == 0 and one["advantages"][2:].abs().min() > 0
    torch.testing.assert_close(two["advantages"], one["advantages"], rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(two["loss"], one["loss"], rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(two["gradient"], one["gradient"], rtol=1e-3, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# end to end


def records(run_dir) -> dict[int, dict]:
    """Step records by step (a re-run step overwrites the earlier record)."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if "event" not in r}


@pytest.mark.slow
@pytest.mark.postgres
def test_grpo_stage_trains_in_the_trainer_and_resumes_mid_buffer(tmp_path, fresh_database_dsn):
    runs = tmp_path / "runs"
    common = [f"runs_root={runs}", "logging.wandb=disabled", "logging.sample_steps=2", "logging.sample_prompts=[a red circle]",
              "data.num_samples=16", "data.num_workers=0", "data.resolution=64", "checkpoint.async_mode=sync"]
    env = {**os.environ, "KREA2_PG_DSN": fresh_database_dsn}

    def train(stage, *extra, faults=None, check=True, ranks=1):
        launcher = [sys.executable] if ranks == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
        command = [*launcher, "-m", "krea2_train", "--config", f"stage/{stage}", *common, *extra]
        result = subprocess.run(command, cwd=tmp_path, env={**env, **({"KREA2_FAULTS": faults} if faults else {})},
                                capture_output=True, text=True, timeout=600)
        if check:
            assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        return result

    train("pretrain_256", "stage.steps=10", "checkpoint.interval=10", "data.global_batch_size=8", "optim.lr=3e-3",
          "optim.warmup_steps=0")
    grpo = [f"stage.init_from={runs / 'pretrain_256'}", "stage.steps=5", "checkpoint.interval=3", "data.global_batch_size=4",
            "grpo.group_size=2", "grpo.num_steps=4", "grpo.sde_window_range=[0,1]", "grpo.updates_per_rollout=2",
            "optim.lr=1e-3"]
    train("grpo", *grpo, "run_name=reference")
    reference = records(runs / "reference")
    assert sorted(reference) == [1, 2, 3, 4, 5]
    names = {"loss", "loss_policy", "kl", "reward_mean", "reward_rubric_mean", "reward_artifact_mean", "advantage_abs_mean",
             "zero_std_ratio", "ratio_mean", "ratio_min", "ratio_max", "clip_fraction", "prompt_weight_mean", "update_index"}
    for step, record in reference.items():
        assert names <= set(record) and all(math.isfinite(record[name]) for name in names), record
        assert record["update_index"] == (step - 1) % 2  # rollouts at steps 1, 3, 5; re-used at 2, 4
        if record["update_index"] == 0:
            assert record["ratio_mean"] == record["ratio_min"] == record["ratio_max"] == 1.0

    # killed after step 4 (its checkpoint at step 3 holds the buffer rolled out at step 3)
    crashed = train("grpo", *grpo, "run_name=faulty", faults="kill@4", check=False)
    assert crashed.returncode != 0
    train("grpo", *grpo, "run_name=faulty")
    resumed_at = [json.loads(line)["step"] for line in (runs / "faulty" / "metrics.jsonl").read_text().splitlines()
                  if json.loads(line).get("event") == "resume"]
    assert resumed_at == [3]
    faulty = records(runs / "faulty")
    stage_metrics = sorted(names | {"logp_rollout_gap_max", "sde_window_start"})
    for step in range(1, 6):
        assert {k: faulty[step][k] for k in stage_metrics} == {k: reference[step][k] for k in stage_metrics}, step

    # two ranks, one group each: the same rollouts (noise keyed by global slot), the batch-wide
    # advantage std and prompt statistics gathered over ranks, the buffer re-used on both
    train("grpo", *grpo, "run_name=two_ranks", "stage.steps=3", ranks=2)
    two_ranks = records(runs / "two_ranks")
    for step in (1, 2, 3):
        for name in ("loss", "loss_policy", "kl", "reward_mean", "advantage_abs_mean", "zero_std_ratio", "ratio_mean", "update_index"):
            assert two_ranks[step][name] == pytest.approx(reference[step][name], rel=1e-4, abs=1e-6), (step, name)
