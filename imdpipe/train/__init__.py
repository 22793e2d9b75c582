"""Loops, devices, checkpoints, evaluation and prediction for the IMD heads on cached features.

Entry points (keyword-only, usable without the CLI)::

    from imdpipe.train import TrainConfig, train, evaluate, predict
    summary = train(cache="cache/", out="runs/imd", config=TrainConfig(size="tiny"))
    metrics = evaluate(run="runs/imd", cache="cache/", split="test")
"""

from imdpipe.train.config import FIELD_HELP, TrainConfig, load_config, save_config
from imdpipe.train.evaluate import evaluate, mann_whitney_auc
from imdpipe.train.loop import train

__all__ = ["FIELD_HELP", "TrainConfig", "evaluate", "load_config", "mann_whitney_auc", "predict", "save_config",
           "train"]


def predict(*args, **kwargs):
    """See :func:`imdpipe.train.predict.predict` (imported lazily: it pulls the video and audio stages)."""
    from imdpipe.train.predict import predict as _predict

    return _predict(*args, **kwargs)
