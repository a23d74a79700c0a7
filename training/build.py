"""Building models from a `ModelConfig`: the one place a preset / hub name / directory plus the
config overrides of the flags (dropout, sparse attention) turn into a model and its tokenizer; and
the precision and seeding helpers every script uses."""
from __future__ import annotations

import random

import numpy as np
import torch

from common.errors import ConfigError
from common.precision import autocast  # noqa: F401  (re-exported for the scripts)
from common.params import count_parameters  # noqa: F401  (re-exported for the scripts)
from training.config import ModelConfig


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def build_model(model_cls, cfg: ModelConfig, **overrides):
    """`model_cls.from_name_or_path(cfg.spec, ...)` with the config overrides of `cfg` (dropout,
    sparse attention) and the caller's.  A GPT2Config field the model rejects is a ConfigError
    naming that field (the CLI maps it to its flag)."""
    kwargs = {**cfg.overrides(), **overrides}
    try:
        return model_cls.from_name_or_path(cfg.spec, random_init=cfg.random_init, **kwargs)
    except ValueError as exc:
        import re

        for field in kwargs:
            if re.search(rf"\b{field}\b", str(exc)):
                raise ConfigError(field, str(exc)) from None
        raise


def load_tokenizer_for(cfg: ModelConfig):
    from models.tokenizer import load_tokenizer

    return load_tokenizer(cfg.tokenizer, None if cfg.random_init else cfg.spec)
