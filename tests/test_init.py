"""Initialization of the model from pretrained weights: timm names through timm's hub cache, and
trained imdpipe checkpoints onto another label set."""

from __future__ import annotations

import dataclasses
import hashlib

import pytest
import timm
import torch

from imdpipe.heads import ModelConfig, build_model
from imdpipe.heads.visual import VISUAL_SIZES

TINY_VIT = "vit_tiny_patch16_224.augreg_in21k"  # 192 wide, 12 blocks, 3 heads: small enough for a test


def fake_hub_cache(root, name: str, state_dict: dict) -> str:
    """Lay out ``state_dict`` as the Hugging Face hub cache holds timm's ``timm/<name>`` weights."""
    from safetensors.torch import save_file

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / f"models--timm--{name}"
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    path = snap / "model.safetensors"
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))
    return str(path)


@pytest.fixture
def tiny_vit_weights():
    torch.manual_seed(0)
    vit = timm.create_model(TINY_VIT, pretrained=False)  # head: 21843 ImageNet-21K classes
    with torch.no_grad():
        for p in vit.parameters():  # distinctive values (timm zero-inits biases)
            p.add_(torch.randn_like(p) * 0.05)
    return {k: v.detach().clone() for k, v in vit.state_dict().items()}


@pytest.fixture
def vit_tiny_size(monkeypatch):
    """Give the ``tiny`` size the widths of timm's ViT-Ti/16 so a registered timm name fits it."""
    monkeypatch.setitem(VISUAL_SIZES, "tiny", {"embed_dim": 192, "depth": 12, "num_heads": 3, "mlp_ratio": 4.0,
                                               "qkv_bias": True, "num_factorized": 1})


def test_init_from_timm_name_loads_through_the_hub_cache(tmp_path, monkeypatch, tiny_vit_weights, vit_tiny_size):
    import huggingface_hub.constants

    file = fake_hub_cache(tmp_path, TINY_VIT, tiny_vit_weights)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    cfg = ModelConfig(num_classes=3, size="tiny", fusion="none", modalities=("rgb", "flow"), num_frames=2,
                      img_size=32)
    model = build_model(cfg, init_checkpoint=TINY_VIT)

    report = model.init_report
    assert report["kind"] == "timm" and report["file"] == file
    assert report["sha256"] == hashlib.sha256(open(file, "rb").read()).hexdigest()
    assert report["loaded"] == ["visual.streams.rgb", "visual.streams.flow"]
    assert report["new"] == ["head", "head_norm", "visual.fuse"]
    for stream in model.visual.streams.values():
        sd = stream.state_dict()
        for key in ("blocks.0.attn.qkv.weight", "blocks.11.mlp.fc2.bias", "norm.weight", "cls_token"):
            assert torch.equal(sd[key], tiny_vit_weights[key]), key
        # the last block is factorized: temporal attention starts as a copy of the spatial one
        assert torch.equal(sd["blocks.11.temporal_attn.qkv.weight"], tiny_vit_weights["blocks.11.attn.qkv.weight"])
    logits, _ = model(torch.randn(1, 2, 3, 32, 32), torch.randn(1, 2, 2, 32, 32))
    assert logits.shape == (1, 3) and torch.isfinite(logits).all()


def test_timm_name_offline_without_a_cached_copy_is_one_clear_error(tmp_path, monkeypatch, vit_tiny_size):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cfg = ModelConfig(num_classes=3, size="tiny", fusion="none", modalities=("rgb",), num_frames=2, img_size=32)
    with pytest.raises(FileNotFoundError) as err:
        build_model(cfg, init_checkpoint=TINY_VIT)
    msg = str(err.value)
    assert "--init-checkpoint" in msg and "local file" in msg and f"{TINY_VIT}.safetensors" in msg
    with pytest.raises(ValueError, match="not a file and not a timm model name"):
        build_model(cfg, init_checkpoint="no_such_vit_name")


def _tiny_cfg(**kw) -> ModelConfig:
    base = dict(num_classes=5, size="tiny", fusion="imd", modalities=("rgb", "flow", "audio"), audio_dim=16,
                num_frames=4, img_size=32)
    return ModelConfig(**{**base, **kw})


def _save_run_checkpoint(model, path) -> None:
    cfg = dataclasses.asdict(model.config)
    cfg["modalities"] = list(cfg["modalities"])
    torch.save({"model": model.state_dict(), "model_config": cfg, "config": {}, "labels": []}, path)


def test_init_from_an_imdpipe_checkpoint_keeps_streams_and_renews_the_classifier(tmp_path):
    torch.manual_seed(0)
    source = build_model(_tiny_cfg(num_classes=5))
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path / "checkpoint-best.pt"
    _save_run_checkpoint(source, path)

    torch.manual_seed(1)
    fresh = build_model(_tiny_cfg(num_classes=3))
    torch.manual_seed(1)
    model = build_model(_tiny_cfg(num_classes=3), init_checkpoint=str(path))
    src, got, new = source.state_dict(), model.state_dict(), fresh.state_dict()
    for key in got:
        if key.startswith(("visual.", "audio.", "fusion.")):
            assert torch.equal(got[key], src[key]), key
        else:  # head_norm and head: the new label set's classifier, as freshly initialized
            assert key.startswith("head") and torch.equal(got[key], new[key]), key
    report = model.init_report
    assert report["kind"] == "imdpipe" and report["new"] == ["head", "head_norm"]
    assert set(report["loaded"]) == {"visual.streams.rgb", "visual.streams.flow", "visual.fuse", "audio", "fusion"}
    assert report["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()

    # another fusion and a longer clip: streams still load (time embedding interpolated), the rest is new
    other = build_model(_tiny_cfg(num_classes=3, fusion="gmu", num_frames=8), init_checkpoint=str(path))
    assert {"visual.streams.rgb", "visual.streams.flow", "visual.fuse"} == set(other.init_report["loaded"])
    assert any("fusion not loaded" in n for n in other.init_report["notes"])
    te = other.visual.streams["rgb"].time_embed
    assert te.shape[1] == 8
    assert torch.allclose(te[0, 0], src["visual.streams.rgb.time_embed"][0, 0])
    assert torch.allclose(te[0, -1], src["visual.streams.rgb.time_embed"][0, -1])
    assert torch.equal(other.visual.streams["flow"].blocks[0].attn.qkv.weight,
                       src["visual.streams.flow.blocks.0.attn.qkv.weight"])

    with pytest.raises(ValueError, match="holds a 'tiny' model"):
        build_model(_tiny_cfg(size="small"), init_checkpoint=str(path), device="meta")
    rgb_only = build_model(_tiny_cfg(fusion="none", modalities=("rgb",)))
    _save_run_checkpoint(rgb_only, tmp_path / "rgb.pt")
    with pytest.raises(ValueError, match="has no flow stream"):
        build_model(_tiny_cfg(), init_checkpoint=str(tmp_path / "rgb.pt"))


def test_preflight_names_the_makefile_variable_of_a_missing_model(tmp_path, monkeypatch, tiny_vit_weights, capsys):
    import huggingface_hub.constants

    from imdpipe.cli.preflight import main

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert main([f"INIT=init:{TINY_VIT}", "TEXT_MODEL=text:bert-base-uncased"]) == 2
    err = capsys.readouterr().err
    assert err.count("make:") == 1 and "INIT vit_tiny" in err and "Set TEXT_MODEL=" in err
    fake_hub_cache(tmp_path, TINY_VIT, tiny_vit_weights)
    (tmp_path / "bert").mkdir()
    assert main([f"INIT=init:{TINY_VIT}", f"TEXT_MODEL=text:{tmp_path / 'bert'}", "INIT=init:none"]) == 0
    assert main(["INIT=init:"]) == 2 and "INIT is empty" in capsys.readouterr().err


@pytest.mark.parametrize("target", ["ucf101", "k400", "hmdb51"])
def test_make_targets_use_the_papers_init_and_encoder(target):
    import shutil
    import subprocess
    from pathlib import Path

    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run(["make", "-n", target, "DATA=d", "CACHE=c"], cwd=repo, capture_output=True, text=True,
                         check=True).stdout
    train_line = next(line for line in out.splitlines() if " train " in line)
    assert "--init-checkpoint vit_base_patch16_224.augreg_in21k" in train_line and "--recipe paper" in train_line
    assert "--text-model bert-base-uncased" in out
    large = subprocess.run(["make", "-n", target, "DATA=d", "CACHE=c", "SIZE=large"], cwd=repo,
                           capture_output=True, text=True, check=True).stdout
    assert "--init-checkpoint vit_large_patch16_224.augreg_in21k" in large
