"""Tests of imdpipe.heads.info.model_info and the ``imdpipe model-info`` command."""

from __future__ import annotations

import json

import pytest
import torch
from timm.layers.attention import Attention
from typer.testing import CliRunner

from imdpipe.cli.main import app
from imdpipe.heads import ModelConfig, build_model
from imdpipe.heads.info import count_flops, model_info

runner = CliRunner()


def test_attention_flops_are_counted_exactly():
    L, D = 10, 16
    attn = Attention(D, num_heads=2, qkv_bias=True)
    attn.fused_attn = True  # must be switched off while counting, then restored
    flops = count_flops(attn, torch.randn(1, L, D))
    qkv, scores, mix, proj = 2 * L * D * 3 * D, 2 * L * L * D, 2 * L * L * D, 2 * L * D * D
    assert flops == qkv + scores + mix + proj
    assert attn.fused_attn is True


def test_model_info_tiny_matches_the_model():
    info = model_info(size="tiny", frames=2, img_size=32)
    model = build_model(ModelConfig(num_classes=400, size="tiny", num_frames=2, img_size=32), device="meta")
    assert info["params_per_stream"] == {
        k: sum(p.numel() for p in s.parameters()) for k, s in model.visual.streams.items()
    }
    assert info["params_total"] == sum(p.numel() for p in model.parameters())
    assert info["paper"] == {}
    # Twice the frames: the per-frame part doubles, temporal attention scores grow 4x, the head is fixed.
    info4 = model_info(size="tiny", frames=4, img_size=32)
    assert 1.9 < info4["flops_per_view"] / info["flops_per_view"] < 2.1


def test_model_info_base_beside_paper():
    info = model_info(size="base", frames=8)
    assert abs(info["params_per_stream"]["rgb"] / 88.6e6 - 1) < 0.05
    # Two ViT-B/16 streams at 8 frames: 2 x 8 x 35.13 GFLOPs plus the temporal attention (~597).
    assert 590 < info["gflops_per_view"] < 605
    assert info["paper"]["gflops_per_view"] == 372.0
    assert info["paper"]["params_per_stream"] == 88.6e6


def test_cli_json_prints_one_object():
    result = runner.invoke(
        app, ["model-info", "--size", "tiny", "--frames", "2", "--img-size", "32", "--json"]
    )
    assert result.exit_code == 0, result.output
    obj = json.loads(result.stdout)
    assert {"size", "frames", "params_per_stream", "params_total", "gflops_per_view", "paper"} <= set(obj)
    assert obj["size"] == "tiny" and obj["frames"] == 2
    assert set(obj["params_per_stream"]) == {"rgb", "flow"}
    assert obj == json.loads(json.dumps(model_info(size="tiny", frames=2, img_size=32)))


def test_cli_table_and_bad_size():
    result = runner.invoke(app, ["model-info", "--size", "small", "--frames", "8"])
    assert result.exit_code == 0, result.output
    assert "GFLOPs per view" in result.stdout and "47.9M" in result.stdout and "239.2" in result.stdout
    bad = runner.invoke(app, ["model-info", "--size", "huge"])
    assert bad.exit_code != 0


@pytest.mark.parametrize("img_size", [100])
def test_model_info_rejects_bad_img_size(img_size):
    with pytest.raises(ValueError, match="multiple of the patch size"):
        model_info(size="tiny", frames=2, img_size=img_size)


def test_tiny_flops_golden_value():
    """Count of the full tiny model by hand (multiply-add = 2 FLOPs, biases and norms not counted)."""
    T, img, K = 2, 32, 400
    D, depth, n_st, H = 96, 3, 1, 384  # tiny widths
    N, S, M = (img // 16) ** 2, 1 + (img // 16) ** 2, 1 + T * (img // 16) ** 2

    def stream(C):
        f = 2 * T * N * C * 16 * 16 * D  # patch embedding
        spatial = T * (2 * S * D * 3 * D + 2 * 2 * S * S * D + 2 * S * D * D)  # per-frame attention
        mlp = 2 * 2 * M * D * H
        temporal = N * (2 * T * D * 3 * D + 2 * 2 * T * T * D + 2 * T * D * D) + 2 * N * T * D * D  # + LR
        return f + depth * (spatial + mlp) + n_st * temporal

    fuse = 2 * 2 * D * D + 2 * D * D
    audio = 2 * 768 * D + 2 * D * D
    Dz = 2 * D
    imd = (2 * Dz * D + 2 * D * Dz + 2 * Dz) + (2 * Dz * D + 2 * D * D)  # Eq. 4 and Eq. 8 MLPs
    head = 2 * D * D + 2 * D * K
    expected = stream(3) + stream(2) + fuse + audio + imd + head
    assert model_info(size="tiny", frames=T, img_size=img)["flops_per_view"] == expected
