"""Rewards by name, with weights from the config (``grpo.rewards: {name: weight}``).

Every registered reward scores one decoded image (uint8 ``[H, W, 3]``) against its prompt's facts
and returns a float in [0, 1]. Rewards run on the host (the shapes detector is numpy); a batch of
images comes in as ``[B, 3, H, W]`` in [-1, 1] (what ``Conditioner.decode_tokens`` returns).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from krea2_train.rewards.shapes_rewards import artifact_reward, rubric_reward

RewardFn = Callable[[np.ndarray, dict], float]

REWARDS: dict[str, RewardFn] = {
    "rubric": rubric_reward,
    "artifact": artifact_reward,
}
"""Each maps ``(image uint8 [H, W, 3], facts) -> score in [0, 1]``."""


def images_to_uint8(images: torch.Tensor) -> np.ndarray:
    """``[B, 3, H, W]`` in [-1, 1] -> uint8 ``[B, H, W, 3]`` (the rounding of ``generate.to_pil``)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W], got shape {tuple(images.shape)}")
    pixels = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()


class MultiReward:
    """Named rewards and their weights (weights > 0, order as given)."""

    def __init__(self, weights: Mapping[str, float]) -> None:
        if not weights:
            raise ValueError("grpo.rewards is empty: name at least one reward, e.g. {rubric: 1.0}")
        unknown = sorted(set(weights) - set(REWARDS))
        if unknown:
            raise ValueError(f"grpo.rewards names unknown rewards {unknown}; known: {sorted(REWARDS)}")
        for name, weight in weights.items():
            if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight > 0):
                raise ValueError(f"grpo.rewards.{name} must be a positive number, got {weight!r}")
        self.weights = {name: float(weight) for name, weight in weights.items()}

    @property
    def names(self) -> list[str]:
        return list(self.weights)

    def __call__(self, images: torch.Tensor, facts: Sequence[dict]) -> dict[str, np.ndarray]:
        """Score every image with every reward: ``{name: float64 [B]}``."""
        pixels = images_to_uint8(images)
        if len(facts) != len(pixels):
            raise ValueError(f"{len(facts)} facts for {len(pixels)} images")
        return {
            name: np.array([REWARDS[name](image, fact) for image, fact in zip(pixels, facts)], dtype=np.float64)
            for name in self.weights
        }


def build_rewards(weights: Mapping[str, float]) -> MultiReward:
    return MultiReward(weights)
