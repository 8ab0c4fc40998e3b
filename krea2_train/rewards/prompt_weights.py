"""Prompt re-weighting from live reward statistics (Krea: "prompts that are too easy, hopeless or
low-variance are down-weighted").

Per prompt id (the dataset's sample id) we keep running statistics of its groups' success
``s = sum_k w_k r_k / sum_k w_k`` (in [0, 1], the rewards being in [0, 1]): the number of groups
seen ``n``, and exponential moving averages (decay ``ema``; the first visit initialises them) of
the group mean ``m`` and the group std ``d``.

The rule, applied to a prompt's policy-loss term after its current group has updated its stats::

    n <  min_visits:  weight = 1                                        (not enough evidence)
    otherwise:        difficulty = clip(min(m, 1 - m) / saturation_margin, 0, 1)
                                   (0 when always solved: too easy; 0 when never: hopeless)
                      spread     = clip(d / min_std, 0, 1)               (0 when low-variance)
                      weight     = min_weight + (1 - min_weight) * difficulty * spread

``min_weight > 0`` keeps every prompt in play, so a prompt that became learnable is noticed. The
weights are not renormalised: down-weighted prompts contribute less, the others keep their scale.

The table must be the same on every rank (a prompt lands on different ranks in different
epochs): the stage all-gathers each step's ``(id, m, d)`` before :meth:`PromptStats.update`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class PromptReweighting:
    """Knobs of the rule above (``grpo.reweight_*`` in the config)."""

    enabled: bool = True
    ema: float = 0.9
    min_visits: int = 2
    saturation_margin: float = 0.1
    min_std: float = 0.05
    min_weight: float = 0.1

    def __post_init__(self) -> None:
        if not 0 <= self.ema < 1:
            raise ValueError(f"grpo.reweight_ema must be in [0, 1), got {self.ema}")
        if self.min_visits < 1:
            raise ValueError(f"grpo.reweight_min_visits must be >= 1, got {self.min_visits}")
        if not 0 < self.saturation_margin <= 0.5:
            raise ValueError(f"grpo.reweight_saturation_margin must be in (0, 0.5], got {self.saturation_margin}")
        if not self.min_std > 0:
            raise ValueError(f"grpo.reweight_min_std must be positive, got {self.min_std}")
        if not 0 < self.min_weight <= 1:
            raise ValueError(f"grpo.reweight_min_weight must be in (0, 1], got {self.min_weight}")


class PromptStats:
    """Running per-prompt statistics ``{id: (n, mean, std)}`` and the weights they give."""

    def __init__(self, rule: PromptReweighting) -> None:
        self.rule = rule
        self.table: dict[int, tuple[int, float, float]] = {}

    def update(self, entries: Iterable[tuple[int, float, float]]) -> None:
        """Fold in one group per entry ``(prompt id, group mean success, group std)``, in order."""
        decay = self.rule.ema
        for prompt_id, mean, std in entries:
            prompt_id = int(prompt_id)
            if prompt_id not in self.table:
                self.table[prompt_id] = (1, float(mean), float(std))
                continue
            n, old_mean, old_std = self.table[prompt_id]
            self.table[prompt_id] = (n + 1, decay * old_mean + (1 - decay) * mean, decay * old_std + (1 - decay) * std)

    def weight(self, prompt_id: int) -> float:
        rule = self.rule
        n, mean, std = self.table.get(int(prompt_id), (0, 0.5, 1.0))
        if not rule.enabled or n < rule.min_visits:
            return 1.0
        difficulty = min(max(min(mean, 1 - mean) / rule.saturation_margin, 0.0), 1.0)
        spread = min(max(std / rule.min_std, 0.0), 1.0)
        weight = rule.min_weight + (1 - rule.min_weight) * difficulty * spread
        return weight if math.isfinite(weight) else rule.min_weight

    def weights(self, prompt_ids: Sequence[int]) -> list[float]:
        return [self.weight(prompt_id) for prompt_id in prompt_ids]

    def state_dict(self) -> dict:
        return {"table": {int(k): tuple(v) for k, v in self.table.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.table = {int(k): (int(v[0]), float(v[1]), float(v[2])) for k, v in state["table"].items()}
