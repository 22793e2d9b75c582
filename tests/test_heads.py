"""Tests of imdpipe.heads: shapes, gradients, IMD masking, TimeSformer init invariance, ViT init."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from timm.layers import resample_abs_pos_embed
from timm.models import adapt_input_conv
from timm.models.vision_transformer import Block, VisionTransformer

from imdpipe.heads import (
    FUSIONS,
    SIZES,
    FactorizedBlock,
    ModelConfig,
    SpatialBlock,
    build_model,
    irrelevant_modality_dropout,
)
from imdpipe.heads.visual import VISUAL_SIZES

B, T, IMG, AUDIO = 2, 3, 32, 24  # small: 2x2 patches per frame
NUM_CLASSES = 5


def modalities_for(fusion: str) -> tuple[str, ...]:
    return {"none": ("rgb", "flow"), "audio-only": ("audio",)}.get(fusion, ("rgb", "flow", "audio"))


def make_cfg(fusion: str = "imd", **kw) -> ModelConfig:
    base = {
        "num_classes": NUM_CLASSES,
        "size": "tiny",
        "fusion": fusion,
        "modalities": modalities_for(fusion),
        "alpha": 0.25,
        "scheme": "M",
        "audio_dim": AUDIO,
        "num_frames": T,
        "img_size": IMG,
    }
    return ModelConfig(**{**base, **kw})


def make_inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    rgb = torch.randn(B, T, 3, IMG, IMG, generator=g)
    flow = 20 * torch.rand(B, T, 2, IMG, IMG, generator=g) - 10  # pixels
    audio = torch.randn(B, AUDIO, generator=g)
    return rgb, flow, audio


def set_relevance(model, rev: float) -> None:
    """Make the relevance network output the constant ``rev`` for every clip."""
    proj = model.fusion.relevance.proj
    with torch.no_grad():
        proj.weight.zero_()
        proj.bias.fill_(math.log(rev / (1 - rev)))


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors; the machine is shared
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# Forward / backward for every fusion
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fusion", FUSIONS)
def test_forward_shapes_no_nan(fusion):
    model = build_model(make_cfg(fusion))
    logits, rev = model(*make_inputs())
    assert logits.shape == (B, NUM_CLASSES)
    assert torch.isfinite(logits).all()
    if fusion == "imd":
        assert rev.shape == (B,)
        assert ((rev >= 0) & (rev <= 1)).all()
    else:
        assert rev is None
    assert model.relevance_threshold == 0.25
    rgb, flow, audio = make_inputs()
    silent, _ = model(rgb, flow, torch.zeros_like(audio))  # clips without audio arrive as zeros
    assert torch.isfinite(silent).all()


@pytest.mark.parametrize("fusion", FUSIONS)
def test_every_parameter_gets_a_gradient(fusion):
    model = build_model(make_cfg(fusion)).train()
    for block in model.visual.streams.values() if model.visual else []:
        for blk in block.blocks:
            if isinstance(blk, FactorizedBlock):  # as after training; at init LR = 0 blocks temporal grads
                torch.nn.init.normal_(blk.temporal_fc.weight, std=0.02)
    if fusion == "imd":
        set_relevance(model, 0.9)  # above alpha: the audio half is kept
        torch.nn.init.normal_(model.fusion.relevance.proj.weight, std=1e-3)
    logits, rev = model(*make_inputs())
    loss = logits.logsumexp(-1).mean() + (rev.mean() if rev is not None else 0)
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert no_grad == []


@pytest.mark.parametrize("modalities", [("rgb",), ("flow",), ("rgb", "audio"), ("flow", "audio")])
def test_table3_modality_subsets(modalities):
    fusion = "imd" if "audio" in modalities else "none"
    model = build_model(make_cfg(fusion, modalities=modalities))
    rgb, flow, audio = make_inputs()
    given = {
        "rgb": rgb if "rgb" in modalities else None,
        "flow": flow if "flow" in modalities else None,
        "audio": audio if "audio" in modalities else None,
    }
    logits, _ = model(**given)
    assert logits.shape == (B, NUM_CLASSES)
    assert set(model.visual.streams) == {m for m in modalities if m != "audio"}
    with pytest.raises(ValueError, match="need inputs"):
        model(None, None, None)


# ---------------------------------------------------------------------------------------------
# IMD masking (Eqs. 5-7)
# ---------------------------------------------------------------------------------------------


def test_masking_function_exact():
    audio = torch.randn(3, 4)
    rev = torch.tensor([0.1, 0.25, 0.9])
    out_m = irrelevant_modality_dropout(audio, rev, alpha=0.25, scheme="M")
    assert torch.equal(out_m[0], torch.zeros(4))  # rev < alpha: dropped
    assert torch.equal(out_m[1], audio[1] * 0.25)  # rev == alpha: kept, scaled by rev
    assert torch.equal(out_m[2], audio[2] * 0.9)
    out_w = irrelevant_modality_dropout(audio, rev, alpha=0.25, scheme="W")
    assert torch.equal(out_w, audio * rev[:, None])  # W: always weighted
    with pytest.raises(ValueError, match="scheme"):
        irrelevant_modality_dropout(audio, rev, 0.25, scheme="X")


def _manual_logits(model, rgb, flow, audio, scale: float):
    """Eqs. 6-9 by hand with the audio half multiplied by ``scale``."""
    v, a = model.forward_features(rgb, flow, audio)
    f = model.fusion
    z = torch.cat([a * scale, v], dim=-1)
    return model.head(model.head_norm(f.mlp(f.norm(z))))


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_rev_below_alpha_output_independent_of_audio(mode):
    model = build_model(make_cfg("imd"))
    getattr(model, mode)()
    set_relevance(model, 0.1)
    rgb, flow, audio = make_inputs()
    logits1, rev1 = model(rgb, flow, audio)
    logits2, _rev2 = model(rgb, flow, 5 * torch.randn_like(audio))
    assert torch.allclose(rev1, torch.full((B,), 0.1))
    assert torch.equal(logits1, logits2)
    assert torch.equal(logits1, _manual_logits(model, rgb, flow, audio, 0.0))
    # Dropped audio passes no gradient back to the audio bottleneck.
    model.zero_grad()
    logits1.sum().backward() if mode == "train" else model(rgb, flow, audio)[0].sum().backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.audio.parameters())


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_rev_above_alpha_scales_audio_by_rev(mode):
    model = build_model(make_cfg("imd"))
    getattr(model, mode)()
    set_relevance(model, 0.6)
    rgb, flow, audio = make_inputs()
    logits, rev = model(rgb, flow, audio)
    assert torch.allclose(rev, torch.full((B,), 0.6))
    expected = _manual_logits(model, rgb, flow, audio, rev[:, None])
    assert torch.allclose(logits, expected, rtol=0, atol=1e-6)
    other, _ = model(rgb, flow, torch.randn_like(audio))
    assert not torch.allclose(logits, other)  # the audio is used


def test_scheme_w_always_scales():
    model = build_model(make_cfg("imd", scheme="W")).eval()
    set_relevance(model, 0.1)  # below alpha, still used under W
    rgb, flow, audio = make_inputs()
    logits, rev = model(rgb, flow, audio)
    assert torch.allclose(logits, _manual_logits(model, rgb, flow, audio, rev[:, None]), rtol=0, atol=1e-6)
    assert not torch.allclose(logits, _manual_logits(model, rgb, flow, audio, 0.0))


def test_train_and_eval_agree_without_dropout():
    model = build_model(make_cfg("imd"))
    inputs = make_inputs()
    logits_t, rev_t = model.train()(*inputs)
    logits_e, rev_e = model.eval()(*inputs)
    assert torch.equal(logits_t, logits_e) and torch.equal(rev_t, rev_e)


LOGITS = [5.0, 6.0, 6.5, 8.0, 10.0, 15.0]


@pytest.mark.parametrize("target", [0.0, 0.9])
def test_relevance_gradient_survives_bf16_autocast(target):
    """The relevance logit is float32 under bf16 autocast, so BCE-with-logits keeps its gradient.

    The relevance network's MLP is zeroed (its residual passes ``z`` through) and the projection
    reads coordinate 0, so clip i's logit is ``z[i, 0] = L_i``; the BCE's gradient on it is
    ``sigmoid(L_i) - t``, computed in float64 as the reference.
    """
    from imdpipe.heads.fusion import RelevanceNetwork

    net = RelevanceNetwork(8)
    with torch.no_grad():
        net.mlp.fc2.weight.zero_(), net.mlp.fc2.bias.zero_()
        net.proj.weight.zero_(), net.proj.bias.zero_()
        net.proj.weight[0, 0] = 1.0
    z = torch.zeros(len(LOGITS), 8, dtype=torch.bfloat16)
    z[:, 0] = torch.tensor(LOGITS)  # exact in bf16
    z.requires_grad_(True)
    targets = torch.full((len(LOGITS),), target)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logit = net.forward_logit(z)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logit, targets, reduction="sum")
    assert logit.dtype == torch.float32 and logit.tolist() == LOGITS
    loss.backward()
    expected = torch.sigmoid(torch.tensor(LOGITS, dtype=torch.float64)) - target
    per_clip = z.grad[:, 0].double()  # back in z's bf16
    assert (per_clip.abs() > 0.05).all(), per_clip  # non-zero for every logit up to 15
    assert torch.allclose(per_clip, expected, rtol=1e-2)
    assert float(net.proj.bias.grad) == pytest.approx(float(expected.sum()), rel=1e-6)  # float32 all the way


def test_whole_model_under_bf16_autocast_gives_a_float32_relevance_logit():
    model = build_model(make_cfg("imd"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, rev, rev_logit = model(*make_inputs(), rev_logit=True)
    assert logits.dtype == torch.bfloat16  # the rest of the model does run in bf16
    assert rev_logit.dtype == torch.float32 and torch.equal(rev, torch.sigmoid(rev_logit))
    rev_logit.sum().backward()
    assert model.fusion.relevance.mlp.fc1.weight.grad.abs().sum() > 0


def test_bf16_sigmoid_then_clamped_bce_loses_the_gradient():
    """The failure the float32 logit avoids: bf16 sigmoid is exactly 1 from ~6.5, the clamp kills the gradient."""
    grads = []
    for logit in LOGITS:
        x = torch.tensor([logit], requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            rev = torch.sigmoid(x.bfloat16())
        loss = torch.nn.functional.binary_cross_entropy(rev.float().clamp(1e-6, 1 - 1e-6), torch.tensor([0.9]))
        grads.append(float(torch.autograd.grad(loss, x)[0]))
    assert all(g != 0 for g in grads[:2]) and all(g == 0 for g in grads[2:])


def test_relevance_logit_exposed_and_rev_is_its_sigmoid():
    model = build_model(make_cfg("imd"))
    logits, rev, rev_logit = model(*make_inputs(), rev_logit=True)
    assert torch.equal(rev, torch.sigmoid(rev_logit))
    logits2, rev2 = model(*make_inputs())
    assert torch.equal(logits, logits2) and torch.equal(rev, rev2)
    _, no_rev, no_logit = build_model(make_cfg("gmu"))(*make_inputs(), rev_logit=True)
    assert no_rev is None and no_logit is None


# ---------------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------------

D, HEADS, N = 24, 2, 5


def test_factorized_block_with_zero_lr_equals_spatial_block():
    spatial = SpatialBlock(D, HEADS, qkv_bias=True).eval()
    factorized = FactorizedBlock(D, HEADS, qkv_bias=True).eval()
    missing, unexpected = factorized.load_state_dict(spatial.state_dict(), strict=False)
    assert unexpected == [] and all(k.startswith("temporal_") for k in missing)
    assert factorized.temporal_fc.weight.abs().sum() == 0 and factorized.temporal_fc.bias.abs().sum() == 0
    x = torch.randn(B, 1 + T * N, D)
    assert torch.equal(factorized(x, T), spatial(x, T))
    torch.nn.init.normal_(factorized.temporal_fc.weight, std=0.1)
    assert not torch.allclose(factorized(x, T), spatial(x, T))


def test_spatial_block_with_one_frame_is_a_timm_vit_block():
    ref = Block(D, HEADS, qkv_bias=True).eval()
    block = SpatialBlock(D, HEADS, qkv_bias=True).eval()
    block.load_state_dict(ref.state_dict())
    x = torch.randn(B, 1 + N, D)
    assert torch.allclose(block(x, 1), ref(x), atol=1e-6)


def test_factorized_block_matches_loop_reference():
    blk = FactorizedBlock(D, HEADS, qkv_bias=True).eval()
    torch.nn.init.normal_(blk.temporal_fc.weight, std=0.1)
    x = torch.randn(B, 1 + T * N, D)
    out = blk(x, T)
    # Reference: temporal attention per patch position, then per-frame attention with the CLS
    # repeated per frame and averaged, then the MLP on every token.
    xt = x.clone()
    for n in range(N):
        idx = [1 + t * N + n for t in range(T)]
        seq = x[:, idx]  # (B, T, D)
        xt[:, idx] = seq + blk.temporal_fc(blk.temporal_attn(blk.temporal_norm1(seq)))
    y = xt.clone()
    cls_outs = []
    for t in range(T):
        idx = list(range(1 + t * N, 1 + (t + 1) * N))
        seq = torch.cat([xt[:, :1], xt[:, idx]], dim=1)  # (B, 1+N, D)
        res = blk.attn(blk.norm1(seq))
        y[:, idx] = xt[:, idx] + res[:, 1:]
        cls_outs.append(res[:, :1])
    y[:, :1] = xt[:, :1] + torch.stack(cls_outs).mean(0)
    y = y + blk.mlp(blk.norm2(y))
    assert torch.allclose(out, y, atol=1e-5)


def test_flow_stream_takes_two_channels_and_scales_pixels():
    model = build_model(make_cfg("none", modalities=("flow",)))
    stream = model.visual.streams["flow"]
    assert stream.patch_embed.proj.weight.shape[1] == 2
    _, flow, _ = make_inputs()
    feats = model.visual.forward_features(flow=flow)
    assert torch.allclose(feats["flow"], stream(flow / 20.0))
    with pytest.raises(ValueError, match="expected 2 channels, got 3"):
        stream(torch.randn(B, T, 3, IMG, IMG))
    with pytest.raises(ValueError, match=f"expected {T} frames, got 2"):
        stream(torch.randn(B, 2, 2, IMG, IMG))


# ---------------------------------------------------------------------------------------------
# Initialization from an ImageNet ViT checkpoint
# ---------------------------------------------------------------------------------------------


def tiny_vit(img_size: int = IMG) -> VisionTransformer:
    s = VISUAL_SIZES["tiny"]
    vit = VisionTransformer(
        img_size=img_size,
        patch_size=16,
        embed_dim=s["embed_dim"],
        depth=s["depth"],
        num_heads=s["num_heads"],
        mlp_ratio=s["mlp_ratio"],
        qkv_bias=s["qkv_bias"],
        num_classes=10,
    )
    with torch.no_grad():  # make every tensor distinctive (timm zero-inits biases)
        for p in vit.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return vit


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_init_from_timm_checkpoint_copies_what_it_should(tmp_path, suffix):
    vit = tiny_vit()
    src = {k: v.clone() for k, v in vit.state_dict().items()}
    path = tmp_path / f"vit_tiny{suffix}"
    if suffix == ".pth":
        torch.save(src, path)
    else:
        from safetensors.torch import save_file

        save_file(src, str(path))
    cfg = make_cfg("imd")
    torch.manual_seed(1)
    fresh = build_model(cfg)
    torch.manual_seed(1)
    model = build_model(cfg, init_checkpoint=str(path))

    depth, n_st = VISUAL_SIZES["tiny"]["depth"], VISUAL_SIZES["tiny"]["num_factorized"]
    for name, stream in model.visual.streams.items():
        sd = stream.state_dict()
        copied = [k for k in sd if k in src and k != "patch_embed.proj.weight"]
        for k in copied:
            assert torch.equal(sd[k], src[k]), k
        assert set(copied) == {k for k in src if not k.startswith("head.") and k != "patch_embed.proj.weight"}
        w = src["patch_embed.proj.weight"]
        expected_w = w if name == "rgb" else adapt_input_conv(2, w)
        assert torch.equal(sd["patch_embed.proj.weight"], expected_w)
        assert torch.equal(sd["time_embed"], torch.zeros_like(sd["time_embed"]))
        for i in range(depth - n_st, depth):
            for part in ("qkv.weight", "qkv.bias", "proj.weight", "proj.bias"):
                assert torch.equal(sd[f"blocks.{i}.temporal_attn.{part}"], src[f"blocks.{i}.attn.{part}"])
            assert torch.equal(sd[f"blocks.{i}.temporal_norm1.weight"], src[f"blocks.{i}.norm1.weight"])
            assert sd[f"blocks.{i}.temporal_fc.weight"].abs().sum() == 0
            assert sd[f"blocks.{i}.temporal_fc.bias"].abs().sum() == 0
        assert not any(k.startswith("head") for k in sd)
    # Everything outside the streams keeps its fresh init (the classifier is not loaded).
    fresh_sd = fresh.state_dict()
    for k, v in model.state_dict().items():
        if not k.startswith("visual.streams."):
            assert torch.equal(v, fresh_sd[k]), k
    logits, _ = model(*make_inputs())
    assert torch.isfinite(logits).all()


def save_classic_vit_npz(vit: VisionTransformer, path) -> None:
    """Write ``vit`` in the original JAX ViT / AugReg ``.npz`` layout (the inverse of timm's loader)."""
    import numpy as np

    sd = {k: v.detach().numpy() for k, v in vit.state_dict().items()}
    D = sd["pos_embed"].shape[-1]
    h = vit.blocks[0].attn.num_heads
    w = {
        "embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
        "embedding/bias": sd["patch_embed.proj.bias"],
        "cls": sd["cls_token"],
        "Transformer/posembed_input/pos_embedding": sd["pos_embed"],
        "Transformer/encoder_norm/scale": sd["norm.weight"],
        "Transformer/encoder_norm/bias": sd["norm.bias"],
        "head/kernel": sd["head.weight"].T,
        "head/bias": sd["head.bias"],
    }
    for i in range(len(vit.blocks)):
        b, p = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        mha = p + "MultiHeadDotProductAttention_1/"
        for j, n in enumerate(("query", "key", "value")):
            w[f"{mha}{n}/kernel"] = sd[b + "attn.qkv.weight"][j * D : (j + 1) * D].T.reshape(D, h, D // h)
            w[f"{mha}{n}/bias"] = sd[b + "attn.qkv.bias"][j * D : (j + 1) * D].reshape(h, D // h)
        w[mha + "out/kernel"] = sd[b + "attn.proj.weight"].reshape(D, h, D // h).transpose(1, 2, 0)
        w[mha + "out/bias"] = sd[b + "attn.proj.bias"]
        for ln, name in (("LayerNorm_0", "norm1"), ("LayerNorm_2", "norm2")):
            w[f"{p}{ln}/scale"], w[f"{p}{ln}/bias"] = sd[b + name + ".weight"], sd[b + name + ".bias"]
        for r in range(2):
            w[f"{p}MlpBlock_3/Dense_{r}/kernel"] = sd[f"{b}mlp.fc{r + 1}.weight"].T
            w[f"{p}MlpBlock_3/Dense_{r}/bias"] = sd[f"{b}mlp.fc{r + 1}.bias"]
    np.savez(path, **w)


def test_init_from_jax_npz_checkpoint(tmp_path):
    vit = tiny_vit()
    path = tmp_path / "vit_tiny.npz"
    save_classic_vit_npz(vit, path)
    model = build_model(make_cfg("none", modalities=("rgb",)), init_checkpoint=str(path))
    sd = model.visual.streams["rgb"].state_dict()
    for k, v in vit.state_dict().items():
        if not k.startswith("head."):
            assert torch.allclose(sd[k], v, atol=1e-6), k


def test_init_from_timm_name_uses_create_model(monkeypatch):
    import timm

    vit = tiny_vit()
    calls = []

    def fake_create_model(name, pretrained=False, num_classes=None):
        calls.append((name, pretrained, num_classes))
        return vit

    monkeypatch.setattr(timm, "create_model", fake_create_model)
    model = build_model(
        make_cfg("none", modalities=("rgb",)), init_checkpoint="vit_tiny_patch16_224.augreg_in21k"
    )
    assert calls == [("vit_tiny_patch16_224.augreg_in21k", True, 0)]
    assert torch.equal(model.visual.streams["rgb"].blocks[0].attn.qkv.weight, vit.blocks[0].attn.qkv.weight)


def test_init_interpolates_pos_embed_and_rejects_wrong_widths(tmp_path):
    vit = tiny_vit(img_size=32)  # 2x2 grid
    path = tmp_path / "vit.pth"
    torch.save({"state_dict": vit.state_dict()}, path)  # wrapped checkpoints are unwrapped by timm
    model = build_model(make_cfg("none", modalities=("rgb",), img_size=64), init_checkpoint=str(path))
    pos = model.visual.streams["rgb"].pos_embed
    assert pos.shape == (1, 1 + 16, VISUAL_SIZES["tiny"]["embed_dim"])
    expected = resample_abs_pos_embed(vit.pos_embed.detach(), new_size=[4, 4], num_prefix_tokens=1)
    assert torch.equal(pos.detach(), expected)
    assert torch.equal(pos[:, 0].detach(), vit.pos_embed[:, 0].detach())
    with pytest.raises(ValueError, match="checkpoint width should be embed_dim=768, got 96"):
        build_model(
            make_cfg("none", modalities=("rgb",), size="base"), init_checkpoint=str(path), device="meta"
        )
    with pytest.raises(FileNotFoundError):
        build_model(make_cfg("none", modalities=("rgb",)), init_checkpoint=str(tmp_path / "nope.pth"))
    with pytest.raises(ValueError, match="needs a visual modality"):
        build_model(make_cfg("audio-only"), init_checkpoint=str(path))


# ---------------------------------------------------------------------------------------------
# Sizes and config
# ---------------------------------------------------------------------------------------------


def stream_params(size: str) -> dict[str, int]:
    model = build_model(ModelConfig(num_classes=400, size=size), device="meta")
    return {k: sum(p.numel() for p in s.parameters()) for k, s in model.visual.streams.items()}


def test_base_param_count_within_5_percent_of_paper():
    params = stream_params("base")
    assert abs(params["rgb"] / 88.6e6 - 1) < 0.05
    # ViT-B/16 body (85,798,656 without classifier) + 2 x temporal attention, norm and LR + time embed.
    temporal = 2 * ((768 * 2304 + 2304) + (768 * 768 + 768) + 2 * 768 + (768 * 768 + 768))
    assert params["rgb"] == 85_798_656 + temporal + 8 * 768
    assert params["rgb"] - params["flow"] == 16 * 16 * 768  # one fewer input channel


def test_documented_small_and_large_counts():
    assert stream_params("small")["rgb"] == 50_943_744  # paper: 47.9M (see visual.py)
    assert stream_params("large")["rgb"] == 324_310_016  # paper: 173.7M (see visual.py)


def test_config_round_trip_and_validation():
    cfg = make_cfg("gmu", modalities=["audio", "rgb"], drop_path_rate=0.1)
    assert cfg.modalities == ("rgb", "audio")
    d = dataclasses.asdict(cfg)
    assert ModelConfig(**d) == cfg
    from_json = json.loads(json.dumps(d))  # tuples come back as lists
    assert ModelConfig(**from_json) == cfg
    assert SIZES == ("tiny", "small", "base", "large")
    bad = [
        {"fusion": "concat"},
        {"size": "huge"},
        {"scheme": "X"},
        {"alpha": 1.5},
        {"img_size": 100},
        {"fusion": "none", "modalities": ("rgb", "audio")},
        {"fusion": "imd", "modalities": ("rgb", "flow")},
        {"fusion": "audio-only", "modalities": ("audio", "rgb")},
        {"modalities": ("rgb", "depth", "audio")},
        {"num_classes": 0},
    ]
    for kw in bad:
        fusion = kw.pop("fusion", "imd")
        with pytest.raises(ValueError):
            make_cfg(fusion, **kw)


def test_fusions_accept_only_their_own_options():
    from imdpipe.heads import build_fusion

    layer = build_fusion("imd", 16, 16, 16, hidden_dim=8, alpha=0.5, scheme="W", drop=0.0)
    assert layer.imd.alpha == 0.5 and layer.imd.scheme == "W"
    assert build_fusion("avc", 16, 16, 16, avc_dim=4).out_dim == 4
    assert build_fusion("nl-gate", 16, 16, 16, num_tokens=4).num_tokens == 4
    with pytest.raises(ValueError, match="'gmu' takes no option 'alpha'; its options: none"):
        build_fusion("gmu", 16, 16, 16, alpha=0.25)
    with pytest.raises(ValueError, match="'imd' takes no option 'alpah'.*alpha"):
        build_fusion("imd", 16, 16, 16, alpah=0.25)
    with pytest.raises(ValueError, match="'avc' takes no option 'num_tokens'; its options: avc_dim"):
        build_fusion("avc", 16, 16, 16, num_tokens=4)
    with pytest.raises(ValueError, match="fusion should be one of"):
        build_fusion("concat", 16, 16, 16)
    for fusion in FUSIONS:  # the model hands each fusion only what it takes
        build_model(make_cfg(fusion))
