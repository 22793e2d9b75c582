"""frames.zarr codecs and chunks: JPEG / zstd per array, one position per chunk, plain-zarr reads."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from test_flow import _small_videos, make_cache

from imdpipe.pipeline.flow import FlowSettings, as_stored, extract_flow, extract_video
from imdpipe.pipeline.store import ArraySpec, SettingsMismatch, StageStore, run_stage
from imdpipe.pipeline.zarr_jpeg import Jpeg, JpegCodec

REPO = Path(__file__).resolve().parents[1]
KW = {"backend": "dis", "frames": 4, "size": (48, 64), "preset": "ultrafast", "show_progress": False,
      "workers": 0}
CODECS = {"jpeg": {"rgb_codec": "jpeg", "rgb_quality": 90, "flow_codec": "jpeg", "flow_quality": 95},
          "zstd": {"rgb_codec": "zstd", "flow_codec": "zstd"}}

# Reads a store with zarr alone: importing imdpipe is made impossible. With --reference, the
# JPEG chunks are decoded by an independent codec written here from imagecodecs' two public
# functions under imagecodecs-zarr's codec name (what `pip install imagecodecs-zarr` provides).
READER = r'''
import importlib.metadata as md, json, sys
sys.modules["imdpipe"] = None  # any import of imdpipe now fails
# and zarr does not see imdpipe's installed codec entry point: as on a machine without imdpipe
_mine = md.EntryPoints(e for g in md.entry_points().values() for e in g if not e.value.startswith("imdpipe"))
md.entry_points = lambda **kw: _mine.select(**kw) if kw else _mine
import numpy as np, zarr
if "--reference" in sys.argv:
    import asyncio, imagecodecs
    from dataclasses import dataclass
    from zarr.abc.codec import ArrayBytesCodec
    from zarr.registry import register_codec

    @dataclass(frozen=True)
    class ReferenceJpeg(ArrayBytesCodec):
        is_fixed_size = False
        level: int | None = None

        @classmethod
        def from_dict(cls, data):
            return cls(**data.get("configuration", {}))

        def to_dict(self):
            return {"name": "imagecodecs_jpeg", "configuration": {"level": self.level}}

        async def _decode_single(self, chunk, spec):
            image = imagecodecs.jpeg8_decode(chunk.as_numpy_array())
            return spec.prototype.nd_buffer.from_numpy_array(image.reshape(spec.shape))

        async def _encode_single(self, chunk, spec):
            raise NotImplementedError

    register_codec("imagecodecs_jpeg", ReferenceJpeg)
g = zarr.open_group(sys.argv[1], mode="r")
np.savez(sys.argv[2], rgb=g["rgb"][...], flow=g["flow"][...])
print(json.dumps({k: g[k].metadata.to_dict()["codecs"] for k in ("rgb", "flow")}, default=list))
'''


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """One small frames.zarr per codec over the same 4 videos (2 shards of 2)."""
    videos = _small_videos(tmp_path_factory.mktemp("videos"), 4)
    out = {}
    for name, codecs in CODECS.items():
        cache = tmp_path_factory.mktemp(name)
        make_cache(cache, videos)
        assert extract_flow(cache=cache, videos_per_shard=2, **KW, **codecs).ok == 4
        out[name] = cache
    return videos, out


def _read_in_subprocess(store: Path, tmp_path: Path, *extra) -> tuple[dict, dict]:
    out = tmp_path / "read.npz"
    proc = subprocess.run([sys.executable, "-c", READER, str(store), str(out), *extra], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    with np.load(out) as f:
        return {k: f[k] for k in f.files}, json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("codec", ["zstd", "jpeg"])
def test_each_codec_round_trips_and_reads_with_plain_zarr_without_imdpipe(stores, tmp_path, codec):
    videos, caches = stores
    store = caches[codec] / "frames.zarr"
    g = zarr.open_group(store, mode="r")
    settings = FlowSettings.from_store_attrs(dict(g.attrs))
    rows = [extract_video(v, settings) for v in videos]
    here = {k: g[k][...] for k in ("rgb", "flow")}
    extra = ("--reference",) if codec == "jpeg" else ()
    there, codecs = _read_in_subprocess(store, tmp_path, *extra)
    for k in ("rgb", "flow"):
        assert np.array_equal(here[k], there[k]), k
        assert np.array_equal(here[k], np.stack([as_stored(r, settings)[k] for r in rows])), k
        inner = codecs[k][0]["configuration"]["codecs"]  # sharding_indexed -> the chunk codecs
        names = [c["name"] for c in inner]
        if codec == "zstd":
            assert np.array_equal(here[k], np.stack([r[k] for r in rows])), k  # lossless
            assert names[:2] == ["bytes", "zstd"]
        else:
            assert names[0] == "imagecodecs_jpeg"
            assert inner[0]["configuration"] == {"level": 90 if k == "rgb" else 95}
            exact = np.stack([r[k] for r in rows]).astype(np.float64)
            err = np.abs(here[k] - exact)
            psnr = 10 * np.log10(255 ** 2 / np.mean(err ** 2))
            # measured on these textures: rgb 37.6 dB at q90; flow codes within ~1 level on average
            assert (psnr > 33) if k == "rgb" else (err.mean() < 1.0), (k, psnr, err.mean())
            assert 0 < err.mean(), k  # it is lossy: the test would catch a silent zstd fallback


def test_jpeg_store_reads_through_the_installed_codec_entry_point(stores, tmp_path):
    """`import zarr; zarr.open(...)` with nothing imported by hand: zarr finds the codec itself."""
    if not importlib.metadata.entry_points(group="zarr.codecs", name="imagecodecs_jpeg"):
        pytest.skip("imdpipe's package metadata is not installed with the codec entry point: pip install -e .")
    store = stores[1]["jpeg"] / "frames.zarr"
    out = tmp_path / "x.npy"
    code = (f"import numpy as np, zarr; np.save({str(out)!r}, zarr.open_group({str(store)!r}, mode='r')"
            f"['rgb'][1, 2])")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert np.array_equal(np.load(out), zarr.open_group(store, mode="r")["rgb"][1, 2])


def test_one_chunk_per_position_and_a_clip_decodes_only_its_positions(stores, monkeypatch):
    g = zarr.open_group(stores[1]["jpeg"] / "frames.zarr", mode="r")
    T, H, W = 4, 48, 64
    assert g["rgb"].chunks == (1, 1, H, W, 3) and g["flow"].chunks == (1, 1, H, W, 1)
    assert g["rgb"].shards == (2, T, H, W, 3) and g["flow"].shards == (2, T, H, W, 2)
    z = zarr.open_group(stores[1]["zstd"] / "frames.zarr", mode="r")
    assert z["rgb"].chunks == (1, 1, H, W, 3) and z["flow"].chunks == (1, 1, H, W, 2)
    calls = []
    decode = JpegCodec._decode_sync
    monkeypatch.setattr(JpegCodec, "_decode_sync", lambda self, b, spec: calls.append(1) or decode(self, b, spec))
    clip = g["rgb"][3, 1:3]
    assert len(calls) == 2 and clip.shape == (2, H, W, 3)
    g["flow"][3, 1:3]
    assert len(calls) == 2 + 4  # 2 positions x 2 grey planes


def test_codec_settings_are_recorded_and_a_mismatch_is_refused(stores):
    cache = stores[1]["jpeg"]
    s = zarr.open_group(cache / "frames.zarr", mode="r").attrs["settings"]
    assert (s["rgb_codec"], s["rgb_quality"], s["flow_codec"], s["flow_quality"]) == ("jpeg", 90, "jpeg", 95)
    z = zarr.open_group(stores[1]["zstd"] / "frames.zarr", mode="r").attrs["settings"]
    assert (z["rgb_codec"], z["flow_codec"]) == ("zstd", "zstd") and "rgb_quality" not in z
    with pytest.raises(SettingsMismatch, match="rgb_quality"):
        extract_flow(cache=cache, videos_per_shard=2, **KW, **{**CODECS["jpeg"], "rgb_quality": 80})
    with pytest.raises(SettingsMismatch, match="flow_codec"):
        extract_flow(cache=cache, videos_per_shard=2, **KW, **{**CODECS["jpeg"], "flow_codec": "zstd"})
    with pytest.raises(ValueError, match="rgb-codec"):
        FlowSettings(rgb_codec="png")
    with pytest.raises(ValueError, match="flow-quality"):
        FlowSettings(flow_quality=0)


def test_a_partial_shard_write_never_reencodes_stored_jpeg_videos(tmp_path):
    """Resume writes only the pending videos' chunks: a JPEG re-encode would change done videos."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(4, 2, 16, 24, 3), dtype=np.uint8)
    spec = ArraySpec("x", (2, 16, 24, 3), "uint8", ("t", "y", "x", "c"), chunks=(1, 16, 24, 3),
                     serializer=Jpeg(level=50))

    def open_store():
        return StageStore.open(tmp_path / "s.zarr", stage="t", settings={}, manifest_sha256="m", n_items=4,
                               arrays=[spec], videos_per_shard=4)

    def produce(fail):
        def run(indices):
            for i in indices:
                yield i, (ValueError("bad") if i in fail else {"x": images[i]})
        return run

    store = open_store()
    run_stage(store, produce({1, 2}), eligible=range(4), names=[""] * 4, show_progress=False)
    first = store["x"][...]

    def one_pass(x):  # what one JPEG encode + decode with the array's codec gives
        arr = zarr.create_array(zarr.storage.MemoryStore(), shape=x.shape, chunks=(1, 1, 16, 24, 3),
                                dtype="uint8", serializer=Jpeg(level=50))
        arr[...] = x
        return arr[...]

    assert np.array_equal(first[[0, 3]], one_pass(images[[0, 3]]))
    # re-encoding a decoded JPEG at q50 changes it, so the check below can fail
    assert not np.array_equal(one_pass(first[[0, 3]]), first[[0, 3]])
    run_stage(open_store(), produce(set()), eligible=range(4), names=[""] * 4, show_progress=False)
    second = open_store()["x"][...]
    assert np.array_equal(second[[0, 3]], first[[0, 3]])
    assert np.array_equal(second[[1, 2]], one_pass(images[[1, 2]])) and open_store().done_mask().all()


@pytest.mark.parametrize("codec", ["zstd", "jpeg"])
def test_shard_reader_equals_zarr_and_reads_missing_chunks_as_fill(stores, tmp_path, codec):
    from imdpipe.pipeline.shard_reader import ShardReader
    from imdpipe.train.data import read_positions

    g = zarr.open_group(stores[1][codec] / "frames.zarr", mode="r")
    for name in ("rgb", "flow"):
        arr = g[name]
        reader = ShardReader(arr)
        assert reader.fast
        for video, positions, box in [(0, [0, 2], None), (3, [1, 2, 3], (5, 7, 20, 30)), (2, [3, 3, 3], None)]:
            expect = arr[video][positions]
            if box is not None:
                expect = expect[:, box[0]:box[0] + box[2], box[1]:box[1] + box[3]]
            assert np.array_equal(read_positions(reader, video, np.array(positions), box), expect), (name, video)
    # a video never written reads as the fill value, like zarr (shard file present, and absent)
    spec = ArraySpec("x", (3, 8, 8, 2), "uint8", ("t", "y", "x", "c"), fill_value=128, chunks=(1, 8, 8, 1),
                     **({"serializer": Jpeg(level=90)} if codec == "jpeg" else {}))
    store = StageStore.open(tmp_path / "s.zarr", stage="t", settings={}, manifest_sha256="m", n_items=4,
                            arrays=[spec], videos_per_shard=2)
    store.write_rows(0, 2, {0: {"x": np.full((3, 8, 8, 2), 60, np.uint8)}})
    reader = ShardReader(store["x"])
    assert reader.fast
    assert (reader.read(1, np.arange(3)) == 128).all() and (reader.read(3, np.arange(3)) == 128).all()
    assert np.array_equal(reader.read(0, np.arange(3)), store["x"][0])
    # a damaged shard index is refused (its checksum), not read as data
    shard = next(p for p in (tmp_path / "s.zarr" / "x").rglob("*") if p.is_file() and p.name != "zarr.json")
    raw = bytearray(shard.read_bytes())
    raw[-10] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="(?i)checksum|crc"):
        ShardReader(store["x"]).read(0, np.arange(3))
