"""``imdpipe extract-visual --init-checkpoint``: a pretrained ViT trunk instead of a trained run.

A tiny timm ViT with the ``tiny`` size's widths is made here and saved as a timm ``.pth`` file
(no download); the store must hold that trunk's embeddings, record the weights' hashes, refuse
another checkpoint, and give a head trained on it back its streams (``streams.pt``)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import timm
import torch
import zarr
from train_fixtures import make_cache, tiny_config
from typer.testing import CliRunner

from imdpipe.cli.main import app
from imdpipe.heads.visual import VISUAL_SIZES
from imdpipe.train.data import ClipDataset, open_cache, prepare_inputs
from imdpipe.train.runtime import load_checkpoint, model_from_checkpoint, save_checkpoint, state_sha256

torch.set_num_threads(1)
ARGS = ["--size", "tiny", "--num-frames", "4", "--frame-stride", "1", "--crop-size", "32", "--train-views", "2",
        "--videos-per-shard", "4", "--quiet"]


def _tiny_vit_file(path, seed: int) -> str:
    """A timm ViT of the ``tiny`` size's widths with distinctive random weights, saved as a timm .pth."""
    size = VISUAL_SIZES["tiny"]
    torch.manual_seed(seed)
    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=16, embed_dim=size["embed_dim"], depth=size["depth"], num_heads=size["num_heads"],
        mlp_ratio=size["mlp_ratio"], qkv_bias=True, num_classes=10)
    with torch.no_grad():
        for p in vit.parameters():  # timm zero-inits biases: make every tensor distinctive
            p.add_(torch.randn_like(p) * 0.05)
    torch.save(vit.state_dict(), path)
    return str(path)


@pytest.fixture(scope="module")
def init_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("visual-init")
    cache = make_cache(root / "cache", classes=3, train_per_class=4, test_per_class=2)
    vit = _tiny_vit_file(root / "vit.pth", seed=0)
    result = CliRunner().invoke(app, ["extract-visual", "--cache", str(cache), "--init-checkpoint", vit, *ARGS])
    assert result.exit_code == 0, result.output
    return cache, vit, root


def test_init_checkpoint_store_holds_the_trunks_embeddings_and_its_hashes(init_store):
    from imdpipe.heads import build_model
    from imdpipe.train.config import TrainConfig
    from imdpipe.train.runtime import seed_everything

    cache, vit, _ = init_store
    g = zarr.open_group(cache / "visual.zarr", mode="r")
    assert g["done"][:].all() and g["test_embedding"].shape == (18, 12, 96) and g["train_embedding"].shape[1] == 2
    source = g.attrs["streams"]
    assert source["kind"] == "init" and source["checkpoint"] == vit
    assert source["sha256"] == hashlib.sha256(open(vit, "rb").read()).hexdigest()
    # the reference: the same trunk built directly (seed 0 fixes the fusing FC layers' init)
    cfg = TrainConfig(size="tiny", fusion="none", num_frames=4, frame_stride=1, crop_size=32,
                      modalities=("rgb", "flow"))
    seed_everything(0)
    model = build_model(cfg.model_config(num_classes=3), init_checkpoint=vit).eval()
    vit_sd = torch.load(vit)
    assert torch.equal(model.visual.streams["rgb"].blocks[0].attn.qkv.weight, vit_sd["blocks.0.attn.qkv.weight"])
    assert g.attrs["settings"]["streams_sha256"] == state_sha256(model.visual.state_dict())
    saved = torch.load(cache / "visual.zarr" / "streams.pt", weights_only=True)
    assert state_sha256(saved["visual"]) == saved["streams_sha256"] == g.attrs["settings"]["streams_sha256"]
    info = open_cache(cache, audio=False, relevance=False)
    views = ClipDataset(info, [7], mode="eval", clips=4, crops=3, modalities=("rgb", "flow"), relevance=False,
                        num_frames=4, frame_stride=1, crop_size=32)[0]
    rgb, flow, _ = prepare_inputs({k: v[None] for k, v in views.items() if torch.is_tensor(v)}, ("rgb", "flow"),
                                  torch.device("cpu"), flow_bound=20.0, flatten_views=True)
    with torch.no_grad():
        want = model.visual(rgb, flow).numpy()
    np.testing.assert_allclose(g["test_embedding"][7], want, rtol=2e-3, atol=2e-3)


def test_init_checkpoint_store_refuses_another_checkpoint_and_a_changed_streams_file(init_store, tmp_path):
    from imdpipe.train.visual_cache import streams_state

    cache, vit, root = init_store
    again = CliRunner().invoke(app, ["extract-visual", "--cache", str(cache), "--init-checkpoint", vit, *ARGS])
    assert again.exit_code == 0 and "already done" in again.output.replace("\n", " ")
    other = _tiny_vit_file(tmp_path / "other.pth", seed=1)
    result = CliRunner().invoke(app, ["extract-visual", "--cache", str(cache), "--init-checkpoint", other, *ARGS])
    assert result.exit_code == 2 and "streams_sha256" in result.output and "--overwrite" in result.output
    # streams.pt is what puts a head back on these streams: a changed file is refused, not used
    path = cache / "visual.zarr" / "streams.pt"
    original = path.read_bytes()
    try:
        state = torch.load(path, weights_only=True)
        state["visual"]["fuse.0.bias"] = state["visual"]["fuse.0.bias"] + 0.01
        save_checkpoint(state, path)
        with pytest.raises(ValueError, match="not the ones"):
            streams_state(cache / "visual.zarr")
    finally:
        path.write_bytes(original)


def test_head_on_init_streams_goes_back_onto_them(init_store):
    from imdpipe.train.head_only import train_head_only

    cache, _, root = init_store
    out = root / "head"
    train_head_only(cache=cache, out=out, config=tiny_config(epochs=1, batch_size=4, head_only=True, val_split="last"),
                    show_progress=False)
    ckpt = load_checkpoint(out / "checkpoint-last.pt")
    assert ckpt["streams"]["source"]["kind"] == "init"
    model = model_from_checkpoint(ckpt, torch.device("cpu"))  # streams from visual.zarr/streams.pt, head from ckpt
    assert state_sha256(model.visual.state_dict()) == ckpt["streams"]["streams_sha256"]
    head = {k: v for k, v in model.state_dict().items() if not k.startswith("visual.")}
    assert state_sha256(head) == state_sha256(ckpt["model"])
