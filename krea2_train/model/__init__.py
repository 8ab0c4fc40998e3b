"""The Krea 2 DiT, its presets and checkpoint layouts."""

from krea2_train.model.dit import Krea2DiT
from krea2_train.model.presets import PRESETS, build_model, count_parameters, model_config

__all__ = ["Krea2DiT", "PRESETS", "build_model", "count_parameters", "model_config"]
