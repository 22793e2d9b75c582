"""Training recipes: the paper's (TimeSformer's Kinetics recipe) and imdpipe's cosine one; the
refusal to train the paper's sizes from random weights."""

from __future__ import annotations

import pytest
import yaml

from imdpipe.train.config import RECIPES, TIMESFORMER_CLIP_SECONDS, TrainConfig, load_config, save_config


def test_paper_recipe_is_the_default_for_the_paper_sizes_and_written_out(tmp_path):
    cfg = TrainConfig()  # base
    assert cfg.recipe == "paper"
    expected = {"optimizer": "sgd", "lr": 0.005, "momentum": 0.9, "weight_decay": 1e-4, "batch_size": 64,
                "epochs": 15, "lr_schedule": "step", "lr_milestones": (11, 14), "lr_gamma": 0.1,
                "warmup_epochs": 0.0, "grad_clip": 0.0, "frame_stride": 0, "train_crop": "jitter",
                "jitter_scales": (256, 320), "hflip": True, "head_drop_rate": 0.5}
    for name, value in expected.items():
        assert getattr(cfg, name) == value, name
    assert cfg.clip_seconds == pytest.approx(256 / 30) == TIMESFORMER_CLIP_SECONDS  # 8 x 32 frames at 30 fps
    assert TrainConfig(size="large").recipe == "paper" and TrainConfig(size="small").recipe == "paper"
    assert cfg.recipe_deviations() == {}
    assert cfg.model_config(num_classes=3).head_drop_rate == 0.5

    save_config(cfg, tmp_path / "config.yaml")
    raw = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert raw["recipe"] == "paper" and raw["lr_schedule"] == "step" and raw["lr_milestones"] == [11, 14]
    assert raw["lr"] == 0.005 and raw["clip_seconds"] == pytest.approx(8.5333, abs=1e-4)
    assert raw["val_split"] == "holdout" and raw["val_fraction"] == 0.05
    assert load_config(tmp_path / "config.yaml") == cfg


def test_cosine_recipe_keeps_the_demo_setup_and_explicit_values_win():
    tiny = TrainConfig(size="tiny")
    assert tiny.recipe == "cosine"
    assert (tiny.lr_schedule, tiny.warmup_epochs, tiny.grad_clip, tiny.frame_stride, tiny.clip_seconds,
            tiny.train_crop, tiny.crop_scale, tiny.head_drop_rate) == ("cosine", 1.0, 1.0, 2, 0.0, "resized",
                                                                      (0.25, 1.0), 0.0)
    # the demo's settings: an explicit stride switches the recipe's seconds off, every other value stays
    demo = TrainConfig(size="tiny", frame_stride=1, optimizer="adamw", lr=1e-3, weight_decay=0.05, batch_size=16,
                       epochs=12, warmup_epochs=1.0, val_split="last")
    assert demo.frame_stride == 1 and demo.clip_seconds == 0.0 and demo.lr_schedule == "cosine"
    assert set(demo.recipe_deviations()) == {"frame_stride", "optimizer", "lr", "weight_decay", "batch_size",
                                             "epochs"}

    paper_stride = TrainConfig(frame_stride=3)
    assert paper_stride.clip_seconds == 0.0 and paper_stride.lr_schedule == "step"
    assert TrainConfig(crop_scale=(0.5, 1.0)).train_crop == "resized"
    assert TrainConfig(size="tiny", jitter_scales=(256, 288)).train_crop == "jitter"
    with pytest.raises(ValueError, match="exactly one of frame_stride"):
        TrainConfig(frame_stride=2, clip_seconds=4.0)
    with pytest.raises(ValueError, match="recipe should be one of"):
        TrainConfig(recipe="fancy")

    # switching the recipe re-derives what was the old recipe's, keeps what was set
    lr_set = TrainConfig(lr=0.01)
    cos = lr_set.replace(recipe="cosine")
    assert cos.lr == 0.01 and cos.lr_schedule == "cosine" and cos.frame_stride == 2 and cos.head_drop_rate == 0.0
    assert cos.replace(recipe="paper") == lr_set
    assert set(RECIPES["paper"]) == set(RECIPES["cosine"])


def test_paper_sizes_refuse_random_init_unless_asked():
    with pytest.raises(ValueError) as err:
        TrainConfig(size="base").check_init()
    msg = str(err.value)
    assert "--init-checkpoint vit_base_patch16_224.augreg_in21k" in msg and "--from-scratch" in msg
    with pytest.raises(ValueError, match="no ImageNet-21K ViT of this shape"):
        TrainConfig(size="small").check_init()
    TrainConfig(size="base", from_scratch=True).check_init()
    TrainConfig(size="large", init_checkpoint="/runs/k400").check_init()
    TrainConfig(size="tiny").check_init()  # the demo's size is exempt
    with pytest.raises(ValueError, match="contradict"):
        TrainConfig(init_checkpoint="x.pth", from_scratch=True)
    with pytest.raises(ValueError, match="checkpoints were chosen on the split that is then reported"):
        TrainConfig(val_split="auto").check_val_split()
