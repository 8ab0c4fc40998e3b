"""STPO (krea2_train.stages.preference): the DPO core's identities, the safeguard, the drift it
prevents on a toy problem with an exact reference, and the stage on the tiny DiT and end to end."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from gmm_oracle import GaussianMixture, euler_sample
from helpers import randomise_

from krea2_train.config import load_config
from krea2_train.model import build_model
from krea2_train.stages import StageConfigError, build_stage
from krea2_train.stages.base import StepContext
from krea2_train.stages.preference import (
    PreferenceStage,
    PreferenceStageError,
    StpoObjective,
    add_artifacts,
    per_sample_error,
    stpo_loss,
)


def random_pair_tensors(seed, batch=4, shape=(6, 5)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, *shape, generator=g) for _ in range(6)]  # v_w, v_l, ref_w, ref_l, target_w, target_l


@pytest.mark.parametrize("positive_weight", [0.0, 1.0])  # max(0, gap_w) adds no gradient at gap_w == 0
def test_at_the_reference_the_loss_is_ln2_and_its_gradient_is_the_closed_form(positive_weight):
    v_w, v_l, _, _, target_w, target_l = random_pair_tensors(0)
    v_w.requires_grad_(True), v_l.requires_grad_(True)
    beta = 50.0
    objective = StpoObjective(beta=beta, positive_weight=positive_weight)
    loss, metrics = stpo_loss(objective, v_w, v_l, v_w.detach(), v_l.detach(), target_w, target_l)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7)
    assert metrics["implicit_acc"].item() == 0.0  # strictly positive inside only
    loss.backward()
    # dL/dθ = (β/4) d[e(w) − e(l)]/dθ at the reference: here θ is the velocities themselves
    expected_w = (beta / 4) * 2 * (v_w.detach() - target_w) / v_w[0].numel() / v_w.shape[0]
    expected_l = -(beta / 4) * 2 * (v_l.detach() - target_l) / v_l[0].numel() / v_l.shape[0]
    torch.testing.assert_close(v_w.grad, expected_w)
    torch.testing.assert_close(v_l.grad, expected_l)


def test_swapping_winner_and_loser_negates_the_margin_and_identical_members_give_no_gradient():
    v_w, v_l, ref_w, ref_l, target_w, target_l = random_pair_tensors(1)
    objective = StpoObjective(beta=3.0)

    def inside(loss):  # the loss is −log σ(inside) of one pair
        return -math.log(math.expm1(loss.item()))

    for pair in range(4):
        one = slice(pair, pair + 1)
        forward, _ = stpo_loss(objective, v_w[one], v_l[one], ref_w[one], ref_l[one], target_w[one], target_l[one])
        swapped, _ = stpo_loss(objective, v_l[one], v_w[one], ref_l[one], ref_w[one], target_l[one], target_w[one])
        assert inside(forward) == pytest.approx(-inside(swapped), rel=1e-4, abs=1e-5)

    same = v_w.clone().requires_grad_(True)
    loss, metrics = stpo_loss(objective, same, same, ref_w, ref_w, target_w, target_w)
    loss.backward()
    assert loss.item() == pytest.approx(math.log(2)) and metrics["winner_gap"] == metrics["loser_gap"]
    assert same.grad.abs().max().item() < 1e-7


def test_implicit_accuracy_counts_the_dpo_margin_not_the_positive_penalty():
    """errors e_θ(w) = 2 vs e_ref(w) = 1 and e_θ(l) = 4 vs e_ref(l) = 1: Δ = −2, the policy prefers the
    winner (accuracy 1) though the DPO-Positive penalty of the risen winner error makes inside < 0."""
    def velocity(error):  # per-element-mean squared error ``error`` against a zero target
        return torch.full((1, 4), math.sqrt(error))

    zero = torch.zeros(1, 4)
    objective = StpoObjective(beta=1.0, positive_weight=5.0)
    loss, metrics = stpo_loss(objective, velocity(2.0), velocity(4.0), velocity(1.0), velocity(1.0), zero, zero)
    assert metrics["implicit_acc"].item() == 1.0
    assert loss.item() == pytest.approx(-F.logsigmoid(torch.tensor(-0.5 * (-2.0 + 5.0 * 1.0))).item(), rel=1e-5)  # inside < 0


def test_the_drift_alarm_fires_after_a_streak_of_positive_winner_gaps():
    from krea2_train.stages.preference import DRIFT_ALARM_STEPS

    stage = build_stage(load_config("stage/stpo", ["stage.init_from=sft"]))
    gaps = [0.1] * (DRIFT_ALARM_STEPS - 1) + [-0.1] + [0.2] * (2 * DRIFT_ALARM_STEPS)  # a negative step resets the streak
    alarms = {step: stage.end_step(step, {"winner_gap": gap}) for step, gap in enumerate(gaps, start=1)}
    fired = {step: messages for step, messages in alarms.items() if messages}
    assert sorted(fired) == [2 * DRIFT_ALARM_STEPS, 3 * DRIFT_ALARM_STEPS]
    assert f"winner_gap > 0 for {DRIFT_ALARM_STEPS} steps in a row (now 0.2)" in fired[2 * DRIFT_ALARM_STEPS][0]


def test_the_drift_alarms_streak_is_checkpointed_and_older_checkpoints_without_it_load(tmp_path):
    """A run resumed inside a streak raises the alarm at the step the uninterrupted run does."""
    from krea2_train.stages.preference import DRIFT_ALARM_STEPS
    from krea2_train.train.checkpoint import CheckpointManager, TrainState

    config = load_config("stage/stpo", ["stage.init_from=sft"])
    stage = build_stage(config)
    for step in range(1, DRIFT_ALARM_STEPS - 1):
        assert stage.end_step(step, {"winner_gap": 0.1}) == []
    manager = CheckpointManager(tmp_path / "run", interval=1, async_mode="sync")
    assert manager.save(DRIFT_ALARM_STEPS - 2, {"train_state": TrainState(step=DRIFT_ALARM_STEPS - 2), "stage": stage})
    resumed = build_stage(config)
    CheckpointManager(tmp_path / "run", interval=1).load({"train_state": TrainState(), "stage": resumed})
    assert resumed.end_step(DRIFT_ALARM_STEPS - 1, {"winner_gap": 0.1}) == []
    assert resumed.end_step(DRIFT_ALARM_STEPS, {"winner_gap": 0.1})  # the uninterrupted run's alarm step
    older = CheckpointManager(tmp_path / "older", interval=1, async_mode="sync")  # STPO checkpoints before the streak was saved
    assert older.save(3, {"train_state": TrainState(step=3)})
    from_older = build_stage(config)
    assert CheckpointManager(tmp_path / "older", interval=1).load({"train_state": TrainState(), "stage": from_older}).step == 3
    assert from_older.winner_gap_streak == 0


def test_velocity_beta_equals_noise_beta_over_one_minus_t_squared():
    """ε-space errors are (1 − t)² times v-space errors: β_ε = β_v / (1 − t)² gives the same loss."""
    t, beta = 0.3, 40.0
    v_w, v_l, ref_w, ref_l, _, _ = random_pair_tensors(2)
    g = torch.Generator().manual_seed(5)
    x0_w, x0_l, eps = (torch.randn(4, 6, 5, generator=g) for _ in range(3))
    x_w, x_l = (1 - t) * x0_w + t * eps, (1 - t) * x0_l + t * eps

    def eps_hat(x_t, v):  # ε̂ = x_t + (1 − t) v
        return x_t + (1 - t) * v

    in_velocity, _ = stpo_loss(StpoObjective(beta=beta), v_w, v_l, ref_w, ref_l, eps - x0_w, eps - x0_l)
    in_noise, _ = stpo_loss(
        StpoObjective(beta=beta / (1 - t) ** 2), eps_hat(x_w, v_w), eps_hat(x_l, v_l), eps_hat(x_w, ref_w), eps_hat(x_l, ref_l), eps, eps
    )
    assert in_velocity.item() == pytest.approx(in_noise.item(), rel=1e-5)


def test_the_safeguard_keeps_the_winner_error_from_rising_where_plain_dpo_raises_it():
    """With outputs ``θ + offset`` the output-space proxy is the exact gradient: one small SGD step
    on the safeguarded loss never raises the winner's error; plain DPO does for some pairs."""
    plain_rises = 0
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        offset_w, offset_l, target_w, noise = (torch.randn(1, 8, generator=g) for _ in range(4))
        # a loser whose error grows along the winner's: raising it drags the winner's error up
        target_l = offset_l - (2.0 * (offset_w - target_w) + 0.5 * noise)
        reference = torch.randn(1, 8, generator=g)
        for safeguard in (True, False):
            theta = torch.zeros(1, 8, requires_grad=True)
            # mu > 0 makes the first-order decrease strict, so the step's second-order term cannot undo it
            objective = StpoObjective(beta=10.0, safeguard=safeguard, safeguard_mu=0.1)
            loss, _ = stpo_loss(objective, theta + offset_w, theta + offset_l, reference + offset_w, reference + offset_l, target_w, target_l)
            loss.backward()
            before = per_sample_error(offset_w, target_w).item()
            after = per_sample_error(offset_w - 1e-3 * theta.grad, target_w).item()
            if safeguard:
                assert after < before, seed
            else:
                plain_rises += after > before
    assert plain_rises >= 15


# -- the failure STPO exists for, on a problem with an exact reference ------------------------------

TWO_MODES = GaussianMixture(
    torch.tensor([0.3, 0.7], dtype=torch.float64),
    torch.tensor([[-2.0, 0.0], [2.0, 0.0]], dtype=torch.float64),
    torch.tensor([0.4, 0.4], dtype=torch.float64),
)


class ResidualVelocity(torch.nn.Module):
    """The exact velocity of TWO_MODES plus a trained MLP whose output starts at exactly zero."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(3, 64), torch.nn.SiLU(), torch.nn.Linear(64, 64), torch.nn.SiLU(), torch.nn.Linear(64, 2))
        torch.nn.init.zeros_(self.net[-1].weight)
        torch.nn.init.zeros_(self.net[-1].bias)

    def forward(self, x, t):
        return TWO_MODES.velocity(x, t).float() + self.net(torch.cat([x.float(), t.float()[:, None]], 1))


def mass_of_the_preferred_mode(model) -> float:
    noise = torch.randn(4000, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        samples = euler_sample(lambda x, t: model(x, t).double(), noise, 30)
    return float((samples[:, 0] < 0).double().mean())


def train_on_preferences(objective, steps=400, lr=1e-2, batch=64):
    """Winners from the light mode (mass 0.3), losers from the heavy one; returns (mass before,
    mass after, mean winner gap e_θ(w) − e_ref(w) over the last 50 steps)."""
    torch.manual_seed(0)
    model = ResidualVelocity()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(0)
    before, gaps = mass_of_the_preferred_mode(model), []
    for _ in range(steps):
        winners = TWO_MODES.sample(batch, g, torch.zeros(batch, dtype=torch.long))
        losers = TWO_MODES.sample(batch, g, torch.ones(batch, dtype=torch.long))
        eps = torch.randn(batch, 2, generator=g, dtype=torch.float64)
        t = torch.rand(batch, generator=g, dtype=torch.float64) * 0.98 + 0.01
        x_w, x_l = (1 - t[:, None]) * winners + t[:, None] * eps, (1 - t[:, None]) * losers + t[:, None] * eps
        reference_w, reference_l = TWO_MODES.velocity(x_w, t).float(), TWO_MODES.velocity(x_l, t).float()
        loss, metrics = stpo_loss(objective, model(x_w, t), model(x_l, t), reference_w, reference_l, (eps - winners).float(), (eps - losers).float())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        gaps.append(metrics["winner_gap"].item())
    return before, mass_of_the_preferred_mode(model), sum(gaps[-50:]) / 50


def test_stpo_moves_mass_to_the_preferred_mode_without_the_drift_of_plain_dpo():
    """Both objectives learn the preference (mode mass 0.3 -> > 0.9); plain DPO gets there by
    raising the winner's error far above the reference's (both likelihoods fall: the drift STPO
    targets), STPO lowers it."""
    before, after_dpo, gap_dpo = train_on_preferences(StpoObjective(beta=1.0))
    _, after_stpo, gap_stpo = train_on_preferences(StpoObjective(beta=1.0, positive_weight=1.0, sft_weight=0.1, safeguard=True))
    assert before == pytest.approx(0.3, abs=0.03)
    assert after_dpo > 0.9 and after_stpo > 0.9
    assert gap_dpo > 10.0, gap_dpo
    assert gap_stpo < 0.0, gap_stpo


# -- the stage on the tiny DiT ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def conditioner(tmp_path_factory):
    from krea2_train.conditioning.conditioner import build_conditioner
    from krea2_train.conditioning.tiny import build_tiny_text_encoder

    text_dir = build_tiny_text_encoder(tmp_path_factory.mktemp("text_encoder"), seed=0)
    return build_conditioner("pixel", text_dir, max_text_tokens=16)


def stpo_config(tmp_path, *overrides):
    return load_config("stage/stpo", [f"runs_root={tmp_path}", "stage.init_from=somewhere", "model.overrides={num_layers: 2}", *overrides])


def test_the_stage_refuses_bad_settings(tmp_path):
    with pytest.raises(PreferenceStageError, match="needs stage.init_from"):
        build_stage(load_config("stage/stpo", [f"runs_root={tmp_path}", "stage.init_from=null"]))
    with pytest.raises(PreferenceStageError, match="stpo.loser must be one of"):
        build_stage(stpo_config(tmp_path, "stpo.loser=random"))
    with pytest.raises(PreferenceStageError, match="stpo.beta"):
        build_stage(stpo_config(tmp_path, "stpo.beta=0"))
    with pytest.raises(StageConfigError, match="float8.enabled is not supported with the stpo stage"):
        build_stage(stpo_config(tmp_path, "float8.enabled=true"))
    for bad in ("stpo.positive_weight=-2", "stpo.sft_weight=-0.1", "stpo.loser_guidance=-1", "stpo.artifact_strength=0"):
        with pytest.raises(PreferenceStageError, match=bad.split("=")[0].replace(".", r"\.")):
            build_stage(stpo_config(tmp_path, bad))


@pytest.mark.parametrize("loser", ["policy", "artifacts", "dataset"])
def test_stage_starts_at_ln2_against_its_reference_and_moves_off_it(tmp_path, conditioner, loser):
    config = stpo_config(tmp_path, f"stpo.loser={loser}", "stpo.loser_steps=2", "stpo.sft_weight=0.5", "stpo.beta=10")
    stage = build_stage(config)
    assert isinstance(stage, PreferenceStage)
    initial = randomise_(build_model("tiny", num_layers=2), seed=3, scale=0.05).state_dict()
    reference = stage.frozen_models(initial)["reference"].eval()
    policy = build_model("tiny", num_layers=2)
    policy.load_state_dict(initial)
    g = torch.Generator().manual_seed(0)
    batch = {"images": torch.rand(2, 3, 16, 24, generator=g) * 2 - 1, "captions": ["a red circle", "two blue squares"]}
    ctx = StepContext(model=policy, conditioner=conditioner, device=torch.device("cpu"), seed=0, step=0, first_slot=0, frozen={"reference": reference})
    if loser == "dataset":  # a pair's loser comes with the batch, and is needed
        with pytest.raises(PreferenceStageError, match="stpo.loser=dataset needs batches of preference pairs"):
            stage.loss(ctx, batch)
        batch["loser_images"] = torch.rand(2, 3, 16, 24, generator=g) * 2 - 1
    loss, metrics = stage.loss(ctx, batch)
    assert metrics["loss_dpo"].item() == pytest.approx(math.log(2), abs=1e-6)
    assert metrics["winner_gap"].item() == metrics["loser_gap"].item() == 0.0
    assert loss.item() == pytest.approx(math.log(2) + 0.5 * metrics["loss_sft"].item(), rel=1e-6)
    assert all(v.dim() == 0 and not v.requires_grad for v in metrics.values())
    # the same step draws the same losers and noise (keyed randomness): the loss is reproducible
    again, _ = stage.loss(ctx, batch)
    assert again.item() == loss.item()

    optimizer = torch.optim.SGD(policy.parameters(), lr=1e-3)
    loss.backward()
    optimizer.step()
    _, moved = stage.loss(ctx, batch)
    assert moved["loss_dpo"].item() < math.log(2) and moved["implicit_acc"].item() > 0
    for key, value in reference.state_dict().items():  # the reference never trains
        assert torch.equal(value, initial[key]), key
    if loser == "dataset":  # the batch's losers are the losers: the same pairs swapped flip the margin's sign
        swapped = batch | {"images": batch["loser_images"], "loser_images": batch["images"]}
        _, flipped = stage.loss(ctx, swapped)
        assert flipped["winner_gap"].item() == pytest.approx(moved["loser_gap"].item(), rel=1e-5)
        assert flipped["loser_gap"].item() == pytest.approx(moved["winner_gap"].item(), rel=1e-5)


def test_guided_policy_losers_run_the_same_forwards_whatever_the_captions_length(tmp_path):
    """With CFG losers, a micro-batch whose captions pad longer than the empty prompt ran its two
    passes one after the other, where a shorter one ran them as one forward: on two ranks with
    different captions, FSDP's collectives no longer paired up (gloo: a size mismatch; NCCL: a
    hang). Both texts are now padded to one length: one forward of 2B per sampler step, always."""
    from krea2_train.conditioning.conditioner import build_conditioner
    from krea2_train.conditioning.tiny import build_tiny_text_encoder

    conditioner = build_conditioner("pixel", build_tiny_text_encoder(tmp_path / "text_encoder", seed=0), max_text_tokens=128)
    stage = build_stage(stpo_config(tmp_path, "stpo.loser=policy", "stpo.loser_steps=2", "stpo.loser_guidance=2.0"))
    policy = randomise_(build_model("tiny", num_layers=2), seed=3, scale=0.05)
    forwards = []
    policy.register_forward_pre_hook(lambda module, args, kwargs: forwards.append(tuple(kwargs["encoder_hidden_states"].shape[:2])), with_kwargs=True)
    images = torch.rand(2, 3, 16, 24, generator=torch.Generator().manual_seed(0)) * 2 - 1
    ctx = StepContext(model=policy, conditioner=conditioner, device=torch.device("cpu"), seed=0, step=0, first_slot=0, frozen={})
    for captions in (["a red circle", "two blue squares"], ["a red circle beside " * 20, "two blue squares"]):
        forwards.clear()
        text_states, text_mask = conditioner.encode_text(captions)
        winners, grid = conditioner.encode_images(images)
        stage.loser_tokens(ctx, {"images": images}, images, winners, grid, text_states, text_mask)
        assert [batch for batch, _ in forwards] == [4, 4]  # one forward of both passes per step
        assert {length for _, length in forwards} == {text_states.shape[1]}


def test_artifacts_are_high_frequency_bounded_and_keyed():
    strength = 0.25
    images = torch.zeros(2, 3, 32, 32)  # zero images: the output is the artifact itself

    def make(*seeds, batch=images):
        return add_artifacts(batch, strength, [torch.Generator().manual_seed(seed) for seed in seeds])

    noisy = make(1, 2)
    # reproducible, and exactly ±strength per pixel
    assert torch.equal(noisy, make(1, 2)) and set(noisy.unique().tolist()) == {-strength, strength}

    # keyed: each image's artifact is its own generator's (one generator per image) ...
    assert torch.equal(make(1, batch=images[:1])[0], noisy[0]) and torch.equal(make(2, batch=images[:1])[0], noisy[1])
    assert torch.equal(make(2, 1), noisy.flip(0))
    # ... so different seeds (images of a batch, steps of a run) give different artifacts
    assert not torch.equal(noisy[0], noisy[1])
    other = make(3, 4)
    for a in noisy:
        for b in other:
            assert (a != b).float().mean() > 0.25  # independent ±s noise: about half the pixels differ

    # high-frequency: per-pixel noise, not a smooth pattern. Neighbouring pixels differ by about
    # the amplitude on average (0 for a smooth pattern) ...
    for dim in (-1, -2):
        assert noisy.diff(dim=dim).abs().mean() > 0.5 * strength
    # ... and almost none of its energy survives a 4x4 box blur (white noise keeps 1/16 of it)
    blurred = F.avg_pool2d(noisy, kernel_size=4)
    assert blurred.pow(2).mean() < 0.25 * noisy.pow(2).mean()

    # bounded: clamped to [-1, 1], the rest untouched
    clamped = add_artifacts(torch.ones(1, 3, 4, 4), 0.5, [torch.Generator().manual_seed(0)])
    assert clamped.max().item() == 1.0 and set(clamped.unique().tolist()) <= {0.5, 1.0}


@pytest.mark.slow
@pytest.mark.postgres
def test_stpo_runs_after_pretraining_end_to_end(tmp_path, fresh_database_dsn):
    """pretrain (2 steps) -> stpo with on-policy losers (3 steps), and stpo_human on the shapes
    world's preference pairs (3 steps): the first step is at ln 2 exactly (the reference is the
    initial policy), the metrics are logged, and the policy moves."""
    common = [
        f"runs_root={tmp_path / 'runs'}", "logging.wandb=disabled", "logging.sample_steps=2", "logging.sample_prompts=[a red circle]",
        "data.num_samples=16", "data.num_workers=0", "data.global_batch_size=2", "data.resolution=64", "optim.warmup_steps=0",
    ]
    env = {**os.environ, "KREA2_PG_DSN": fresh_database_dsn}
    stpo = ["--config", "stage/stpo", "stage.init_from=pretrain_256", "stage.steps=3", "checkpoint.interval=3", "stpo.loser_steps=2", "optim.lr=1e-3"]
    two_ranks = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    human = ["--config", "stage/stpo_human", "stage.init_from=pretrain_256", "stage.steps=3", "checkpoint.interval=3", "optim.lr=1e-3"]
    for launcher, stage_args in (
        ([sys.executable], ["--config", "stage/pretrain_256", "stage.steps=2", "checkpoint.interval=2", "irepa.enabled=false"]),
        ([sys.executable], stpo),
        (two_ranks, [*stpo, "run_name=stpo_2ranks"]),
        ([sys.executable], human),
    ):
        result = subprocess.run([*launcher, "-m", "krea2_train", *stage_args, *common], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    def logged_steps(run_name):
        records = [json.loads(line) for line in (tmp_path / "runs" / run_name / "metrics.jsonl").read_text().splitlines()]
        return [r for r in records if "loss_dpo" in r]

    steps = logged_steps("stpo")
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert steps[0]["loss_dpo"] == pytest.approx(math.log(2), abs=1e-5) and steps[0]["implicit_acc"] == 0.0
    assert all(math.isfinite(r["loss"]) for r in steps) and steps[-1]["loss_dpo"] != steps[0]["loss_dpo"]
    assert (tmp_path / "runs" / "stpo" / "loss.png").is_file()
    human_steps = logged_steps("stpo_human")
    assert [r["step"] for r in human_steps] == [1, 2, 3] and human_steps[0]["loss_dpo"] == pytest.approx(math.log(2), abs=1e-5)
    assert all(math.isfinite(r["loss"]) for r in human_steps) and human_steps[-1]["loss_dpo"] != human_steps[0]["loss_dpo"]
    pinned = json.loads((tmp_path / "runs" / "stpo_human" / "manifest.json").read_text())
    assert {shard["kind"] for shard in pinned} == {"pairs"} and sum(shard["num_samples"] for shard in pinned) == 16
    # the run trained on pairs: going on with losers from another source would change its data
    again = subprocess.run([sys.executable, "-m", "krea2_train", *human, "stage.steps=4", "stpo.loser=artifacts", *common],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 1 and "preference pairs (stpo.loser=dataset) true pinned, false now" in again.stderr, again.stderr[-3000:]
    # two ranks, each with its FSDP shard of the policy and of the reference, and its half of
    # every batch (losers sampled from keyed noise): the same run
    for one, two in zip(steps, logged_steps("stpo_2ranks"), strict=True):
        for name in ("loss", "loss_dpo", "loss_sft", "winner_gap", "loser_gap"):
            assert two[name] == pytest.approx(one[name], rel=1e-4, abs=1e-6), (one["step"], name)
