"""Rewards and advantages of the GRPO stage (krea2_train.rewards).

Rubric: 1 on clean renders of the prompt's scene, partial credit on wrong ones. Artifact: clean
renders beat the same renders with injected artifacts, and each penalty responds to its artifact.
Advantages (algorithms.md 3e): zero mean per group, constant groups masked and counted,
advantage_aggr invariant to rescaling one reward (reward_aggr not), global std all-reduced.
"""

import dataclasses
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from krea2_train.data import shapes
from krea2_train.data.shapes import Scene, ShapeFact
from krea2_train.rewards import (
    PromptReweighting,
    PromptStats,
    advantage_aggr,
    aggregate_advantages,
    batch_std,
    build_rewards,
    group_advantages,
    images_to_uint8,
    reward_aggr,
)
from krea2_train.rewards.shapes_rewards import artifact_reward, artifact_terms, rubric_reward


def as_model_images(pil_images) -> torch.Tensor:
    """PIL renders -> [B, 3, H, W] in [-1, 1], what Conditioner.decode_tokens returns."""
    arrays = np.stack([np.asarray(image) for image in pil_images]).astype(np.float32)
    return torch.from_numpy(arrays).permute(0, 3, 1, 2) / 127.5 - 1


# ------------------------------------------------------------------------------------------------
# rubric


def test_rubric_is_one_on_clean_renders_through_the_decode_path():
    samples = [shapes.make_sample(index, 64, seed=5) for index in range(24)]
    images = as_model_images([image for image, _, _ in samples])
    assert np.array_equal(images_to_uint8(images), np.stack([np.asarray(image) for image, _, _ in samples]))
    scores = build_rewards({"rubric": 1.0})(images, [facts for _, _, facts in samples])
    assert scores["rubric"].tolist() == [1.0] * 24


def test_rubric_degrades_on_wrong_renders():
    prompt = Scene("white", (ShapeFact("circle", "red", "large", 0.3, 0.5), ShapeFact("square", "blue", "small", 0.75, 0.5)))
    facts = shapes.facts(prompt)  # 2 shapes, 1 relation: requirements count, background, 2 present, 2 sizes, 1 relation
    assert rubric_reward(np.asarray(shapes.render(prompt, 64)), facts) == 1.0

    def score(scene):
        return rubric_reward(np.asarray(shapes.render(scene, 64)), facts)

    wrong_color = dataclasses.replace(prompt, shapes=(prompt.shapes[0], dataclasses.replace(prompt.shapes[1], color="green")))
    missing = dataclasses.replace(prompt, shapes=prompt.shapes[:1])
    swapped = dataclasses.replace(prompt, shapes=(dataclasses.replace(prompt.shapes[0], x=0.75), dataclasses.replace(prompt.shapes[1], x=0.3)))
    black = dataclasses.replace(prompt, background="black")
    # golden values from the requirement count (7): a wrong colour fails present, size and the relation
    assert score(wrong_color) == pytest.approx(4 / 7)
    assert score(missing) == pytest.approx(3 / 7)  # count, background, the circle and its size
    assert score(swapped) == pytest.approx(6 / 7)  # only the relation fails
    assert score(black) == pytest.approx(6 / 7)
    other = shapes.make_sample(3, 64, seed=5)[0]
    assert rubric_reward(np.asarray(other), facts) < 0.5
    assert rubric_reward(np.asarray(shapes.render(prompt, 64)), {}) == 0.0  # no facts: nothing verifiable


# ------------------------------------------------------------------------------------------------
# artifact


def with_noise(pixels: np.ndarray, std: float, seed: int = 0) -> np.ndarray:
    noisy = pixels.astype(np.float64) + np.random.default_rng(seed).normal(0, std, pixels.shape)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def with_specks(pixels: np.ndarray, count: int, seed: int = 0) -> np.ndarray:
    speckled, rng = pixels.copy(), np.random.default_rng(seed)
    for _ in range(count):
        y, x = rng.integers(2, pixels.shape[0] - 4, size=2)
        speckled[y : y + 2, x : x + 2] = shapes.SHAPE_COLORS["red"]
    return speckled


def with_blob(pixels: np.ndarray) -> np.ndarray:
    """An extra malformed shape (an L of two bars) in the top-left corner."""
    blobbed, side = pixels.copy(), pixels.shape[0]
    y = x = side // 10
    blobbed[y : y + side // 5, x : x + side // 16] = shapes.SHAPE_COLORS["blue"]
    blobbed[y : y + side // 16, x : x + side // 5] = shapes.SHAPE_COLORS["blue"]
    return blobbed


def test_artifact_reward_prefers_clean_renders():
    scene = Scene("white", (ShapeFact("star", "purple", "large", 0.62, 0.6), ShapeFact("circle", "green", "medium", 0.3, 0.7)))
    facts = shapes.facts(scene)
    clean = np.asarray(shapes.render(scene, 96))
    assert artifact_reward(clean, facts) == 1.0
    for name, corrupted, fired in [
        ("noise", with_noise(clean, 25.0), "p_noise"),
        ("specks", with_specks(clean, 6), "p_speck"),
        ("blob", with_blob(clean), "p_shape"),
    ]:
        terms = artifact_terms(corrupted, facts)
        assert terms[fired] > 0.3, (name, terms)
        assert artifact_reward(corrupted, facts) < 0.7, (name, terms)
    assert artifact_terms(with_blob(clean), facts)["p_extra"] == pytest.approx(0.5)  # 3 shapes for 2 asked
    # graded: more artifact, lower reward
    assert artifact_reward(with_noise(clean, 12.0), facts) > artifact_reward(with_noise(clean, 30.0), facts)


def test_artifact_reward_on_clean_dataset_renders_is_near_one():
    rewards = [artifact_reward(np.asarray(image), facts) for image, _, facts in (shapes.make_sample(i, 64, seed=5) for i in range(24))]
    assert min(rewards) > 0.95 and np.mean(rewards) > 0.99, rewards


def test_registry_rejects_unknown_rewards_and_bad_weights():
    with pytest.raises(ValueError, match="unknown rewards \\['aesthetic'\\]"):
        build_rewards({"rubric": 1.0, "aesthetic": 1.0})
    with pytest.raises(ValueError, match="grpo.rewards.artifact must be a positive number"):
        build_rewards({"artifact": 0.0})
    with pytest.raises(ValueError, match="empty"):
        build_rewards({})


# ------------------------------------------------------------------------------------------------
# advantages


def test_group_advantages_golden_values_and_zero_mean_groups():
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5, 0.2, 0.2, 0.2, 0.2, 3.0, 1.0, 2.0, 2.0])
    advantages = group_advantages(rewards, 4)
    grouped = rewards.double().reshape(3, 4)
    std = rewards.double().std(unbiased=False)  # the whole batch, population std (flow_grpo's np.std)
    expected = ((grouped - grouped.mean(1, keepdim=True)) / (std + 1e-4)).reshape(-1).float()
    torch.testing.assert_close(advantages, expected)
    torch.testing.assert_close(advantages.reshape(3, 4).sum(1), torch.zeros(3), atol=1e-6, rtol=0)
    per_group = group_advantages(rewards, 4, std_scope="group")
    assert per_group[:4].double().std(unbiased=False).item() == pytest.approx(1.0, abs=1e-3)

    result = aggregate_advantages({"r": rewards}, {"r": 1.0}, 4, adv_clip_max=1.0)
    assert result.valid.tolist() == [True] * 4 + [False] * 4 + [True] * 4
    assert result.zero_std_ratio.item() == pytest.approx(1 / 3)
    assert torch.equal(result.advantages[4:8], torch.zeros(4))
    assert result.advantages.abs().max().item() == 1.0  # clipped
    with pytest.raises(ValueError, match="groups of 5"):
        group_advantages(rewards, 5)


def test_advantage_aggr_is_scale_invariant_and_reward_aggr_is_not():
    generator = torch.Generator().manual_seed(0)
    rewards = {"rubric": torch.rand(16, generator=generator), "artifact": torch.rand(16, generator=generator)}
    weights = {"rubric": 1.0, "artifact": 0.5}
    rescaled = {**rewards, "artifact": 100 * rewards["artifact"]}
    torch.testing.assert_close(advantage_aggr(rescaled, weights, 4), advantage_aggr(rewards, weights, 4), rtol=1e-3, atol=1e-3)
    base, scaled = reward_aggr(rewards, weights, 4), reward_aggr(rescaled, weights, 4)
    assert (base - scaled).abs().max() > 0.3
    # with the large reward, reward_aggr follows it alone
    alone = group_advantages(rescaled["artifact"], 4)
    assert torch.corrcoef(torch.stack([scaled, alone]))[0, 1] > 0.999
    # a group is masked only when every reward is constant in it
    rewards["rubric"][:4] = 0.3
    result = aggregate_advantages(rewards, weights, 4, aggregation="advantage_aggr")
    assert result.valid[:4].all()
    rewards["artifact"][:4] = 0.9
    assert not aggregate_advantages(rewards, weights, 4, aggregation="advantage_aggr").valid[:4].any()


def _std_worker(rank: int, world: int, port: int, values: torch.Tensor, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        half = values.shape[0] // world
        out[rank] = batch_std(values[rank * half : (rank + 1) * half]).item()
    finally:
        dist.destroy_process_group()


def test_batch_std_is_all_reduced_over_ranks():
    values = torch.tensor([0.0, 1.0, 1.0, 1.0, 5.0, 5.0, 6.0, 7.0])
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_std_worker, args=(2, port, values, out), nprocs=2, join=True)
    expected = values.double().std(unbiased=False).item()
    assert out[0] == pytest.approx(expected, rel=1e-12) and out[1] == pytest.approx(expected, rel=1e-12)
    assert batch_std(values[:4], all_reduce=False).item() == pytest.approx(values[:4].double().std(unbiased=False).item())


# ------------------------------------------------------------------------------------------------
# prompt re-weighting


def test_prompt_weights_down_weight_easy_hopeless_and_flat_prompts():
    rule = PromptReweighting(ema=0.5, min_visits=2, saturation_margin=0.1, min_std=0.05, min_weight=0.1)
    stats = PromptStats(rule)
    visits = {1: (0.99, 0.02), 2: (0.0, 0.0), 3: (0.5, 0.01), 4: (0.5, 0.3), 5: (0.05, 0.2)}
    stats.update([(prompt, mean, std) for prompt, (mean, std) in visits.items()])
    assert stats.weights([1, 2, 3, 4, 5, 6]) == [1.0] * 6  # one visit: not enough evidence
    stats.update([(prompt, mean, std) for prompt, (mean, std) in visits.items()])
    weights = dict(zip(visits, stats.weights(list(visits))))
    assert weights[1] == pytest.approx(0.1 + 0.9 * (0.01 / 0.1) * (0.02 / 0.05))  # too easy
    assert weights[2] == pytest.approx(0.1)  # hopeless
    assert weights[3] == pytest.approx(0.1 + 0.9 * 0.2)  # low variance
    assert weights[4] == 1.0  # learnable
    assert weights[5] == pytest.approx(0.1 + 0.9 * 0.5)  # nearly hopeless
    # the running means move toward new evidence: prompt 2 became learnable
    stats.update([(2, 0.5, 0.3)] * 4)
    assert stats.weight(2) > 0.9
    restored = PromptStats(rule)
    restored.load_state_dict(stats.state_dict())
    assert restored.table == stats.table
    assert PromptStats(dataclasses.replace(rule, enabled=False)).weight(2) == 1.0
    with pytest.raises(ValueError, match="grpo.reweight_min_weight"):
        PromptReweighting(min_weight=0.0)
