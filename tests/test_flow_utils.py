"""Flow utilities: quantization against its formula, flips that negate x, colour pictures."""

import numpy as np
import pytest
import torch

from imdpipe.pipeline.flow_utils import FLOW_BOUND, dequantize, flow_to_color, hflip_flow, quantize

STEP = 2 * FLOW_BOUND / 255  # one quantization step in pixels


def test_quantize_matches_the_formula_by_hand():
    v = np.array([-25.0, -20.0, -19.9, 0.0, 0.07, 0.08, 1.0, 20.0, 33.0], np.float32)
    # q = round(255 * (clip(v, -20, 20) + 20) / 40), computed by hand:
    # -20 -> 0; -19.9 -> 0.6375 -> 1; 0 -> 127.5 -> 128 (round half to even); 0.07 -> 127.946 -> 128;
    # 0.08 -> 128.01 -> 128; 1 -> 133.875 -> 134; 20 -> 255
    assert quantize(v).tolist() == [0, 0, 1, 128, 128, 128, 134, 255, 255]
    assert quantize(v).dtype == np.uint8
    assert dequantize(np.array([0, 255], np.uint8)).tolist() == [-20.0, 20.0]


def test_round_trip_error_is_at_most_half_a_step_and_clips_at_the_bound():
    rng = np.random.default_rng(0)
    v = rng.uniform(-20, 20, size=(64, 80, 2)).astype(np.float32)
    err = np.abs(dequantize(quantize(v)) - v)
    assert err.max() <= STEP / 2 + 1e-5
    assert err.max() > STEP / 2 * 0.9  # the bound is tight, not trivially met
    big = np.array([[-100.0, 20.5], [55.0, -20.0001]], np.float32)
    assert np.allclose(dequantize(quantize(big)), [[-20, 20], [20, -20]])
    # every code maps to a value that quantizes back to itself
    codes = np.arange(256, dtype=np.uint8)
    assert (quantize(dequantize(codes)) == codes).all()


def test_torch_and_numpy_agree():
    rng = np.random.default_rng(1)
    v = rng.uniform(-30, 30, size=(3, 2, 8, 9)).astype(np.float32)
    q_np = quantize(v)
    q_t = quantize(torch.from_numpy(v))
    assert q_t.dtype == torch.uint8 and (q_t.numpy() == q_np).all()
    d_t = dequantize(q_t)
    assert d_t.dtype == torch.float32 and np.allclose(d_t.numpy(), dequantize(q_np), atol=1e-6)


def _field(h=5, w=7):
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    return np.stack([xx * 0.5 - 1.0, yy * 0.25 + 0.3], axis=-1)  # (H, W, 2): x grows right, y down


def test_hflip_numpy_mirrors_and_negates_x():
    f = _field()
    g = hflip_flow(f)
    w = f.shape[1]
    for x in range(w):
        assert np.allclose(g[:, x, 0], -f[:, w - 1 - x, 0])
        assert np.allclose(g[:, x, 1], f[:, w - 1 - x, 1])
    assert np.allclose(hflip_flow(g), f)
    # a batch (N, T, H, W, 2)
    batch = np.stack([np.stack([f, 2 * f])] * 3)
    assert np.allclose(hflip_flow(batch)[2, 1], hflip_flow(2 * f))


def test_hflip_torch_channels_first_and_quantized_codes():
    f = _field()
    t = torch.from_numpy(np.moveaxis(f, -1, 0).copy())  # (2, H, W)
    g = hflip_flow(t)
    assert np.allclose(np.moveaxis(g.numpy(), 0, -1), hflip_flow(f))
    assert np.allclose(t.numpy(), np.moveaxis(f, -1, 0))  # input untouched
    # explicit axes on a numpy channels-first array
    assert np.allclose(hflip_flow(np.moveaxis(f, -1, 0), channel_axis=0, axis_w=2), g.numpy())
    assert np.allclose(hflip_flow(np.moveaxis(f, -1, 0), axis_w=-1), g.numpy())
    # uint8 codes: flipping the codes equals quantizing the flipped flow (255 - q mirrors the grid)
    rng = np.random.default_rng(2)
    v = rng.uniform(-25, 25, size=(4, 6, 9, 2)).astype(np.float32)
    assert (hflip_flow(quantize(v)) == quantize(hflip_flow(v))).mean() > 0.999
    qt = quantize(torch.from_numpy(np.moveaxis(v, -1, -3).copy()))  # (4, 2, 6, 9)
    assert (hflip_flow(qt).numpy() == np.moveaxis(hflip_flow(quantize(v)), -1, -3)).all()


def test_hflip_rejects_a_wrong_channel_axis():
    with pytest.raises(ValueError, match="2 components"):
        hflip_flow(np.zeros((4, 5, 3), np.float32))


def test_flow_to_color_shapes_and_directions():
    f = np.zeros((8, 10, 2), np.float32)
    img = flow_to_color(f)
    assert img.shape == (8, 10, 3) and img.dtype == np.uint8
    assert (img == 255).all()  # no motion is white on the colour wheel
    right = np.zeros((8, 10, 2), np.float32)
    right[..., 0] = 3.0
    left = -right
    a, b = flow_to_color(right)[0, 0], flow_to_color(left)[0, 0]
    assert not np.array_equal(a, b)  # opposite directions get different colours
    assert flow_to_color(quantize(right)).shape == (8, 10, 3)  # uint8 is dequantized first
    t = flow_to_color(torch.from_numpy(np.moveaxis(np.stack([right, left]), -1, 1).copy()))
    assert tuple(t.shape) == (2, 3, 8, 10) and t.dtype == torch.uint8
    assert np.array_equal(t[0, :, 0, 0].numpy(), a)
