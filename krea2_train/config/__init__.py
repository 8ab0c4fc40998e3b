"""Typed run configuration composed from configs/ with Hydra."""

from krea2_train.config.load import ConfigError, load_config, to_yaml
from krea2_train.config.schema import RunConfig

__all__ = ["ConfigError", "RunConfig", "load_config", "to_yaml"]
