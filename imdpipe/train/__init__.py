"""Loops, devices, checkpoints, evaluation and prediction for the IMD heads on cached features.

Entry points (keyword-only, usable without the CLI)::

    from imdpipe.train import TrainConfig, train, evaluate, predict
    summary = train(cache="cache/", out="runs/imd", config=TrainConfig(size="tiny"))
    metrics = evaluate(run="runs/imd", cache="cache/", split="test")
"""

from imdpipe.train.config import FIELD_HELP, TrainConfig, load_config, save_config

__all__ = ["FIELD_HELP", "TrainConfig", "evaluate", "load_config", "mann_whitney_auc", "predict", "save_config",
           "train"]

# The loops pull in torch, the model and the stages: imported on first use, so the CLI starts fast.
_LAZY = {"train": "loop", "evaluate": "evaluate", "mann_whitney_auc": "evaluate", "predict": "predict"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"imdpipe.train.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
