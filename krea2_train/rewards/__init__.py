"""Rewards of the GRPO stage (``krea2_train.stages.grpo``) and the arithmetic that turns them into
advantages.

Krea 2's RL mixes four reward families: an aesthetic VLM fine-tuned on their preference data,
prompt following and text rendering judged by rubrics (each prompt decomposed into verifiable
requirements), and an artifact/structure model against reward hacking. What exists here:

- ``rubric`` (:mod:`.shapes_rewards`): prompt following in the shapes world, a true rubric: the
  prompt's facts are the requirements (count, background, each shape present, each size, each
  stated relation) and :func:`krea2_train.data.shapes.check_image` judges them from pixels.
- ``artifact`` (:mod:`.shapes_rewards`): structure and artifacts in the shapes world, built from
  the same detector (speckle fragments, shapes the detector cannot explain by a clean render,
  extra shapes, high-frequency noise on flat background).

There is NO aesthetic reward: no aesthetic VLM (or any learned preference model) is available
offline, and a stand-in (e.g. a hand-made "prettiness" score) would teach something else under the
same name. Nor is there a text-rendering reward: the shapes world has no text.

Modules:

- :mod:`.registry`: rewards by name, weights from ``grpo.rewards``; scores a batch of images.
- :mod:`.advantages`: per-prompt group advantages (global batch std + 1e-4, all-reduced over
  ranks), ``reward_aggr`` and ``advantage_aggr``, clipping, zero-std groups.
- :mod:`.prompt_weights`: per-prompt running statistics and the down-weighting of prompts that
  are too easy, hopeless or low-variance.
"""

from krea2_train.rewards.advantages import (
    AGGREGATIONS,
    AdvantageResult,
    advantage_aggr,
    aggregate_advantages,
    batch_std,
    group_advantages,
    reward_aggr,
    zero_std_groups,
)
from krea2_train.rewards.prompt_weights import PromptReweighting, PromptStats
from krea2_train.rewards.registry import REWARDS, MultiReward, build_rewards, images_to_uint8

__all__ = [
    "AGGREGATIONS",
    "AdvantageResult",
    "MultiReward",
    "PromptReweighting",
    "PromptStats",
    "REWARDS",
    "advantage_aggr",
    "aggregate_advantages",
    "batch_std",
    "build_rewards",
    "group_advantages",
    "images_to_uint8",
    "reward_aggr",
    "zero_std_groups",
]
