"""Training loader settings: workers per rank, one thread per worker, persistent workers that still
draw each epoch's own clips."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from train_fixtures import make_cache, tiny_config

from imdpipe.train.data import (
    ClipDataset,
    EpochSampler,
    loader_kwargs,
    loader_workers,
    open_cache,
    select_videos,
)
from imdpipe.train.loop import train


class _Threads(Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):
        return torch.tensor([cv2.getNumThreads(), torch.get_num_threads()])


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return make_cache(tmp_path_factory.mktemp("loader") / "cache")


def test_workers_per_rank_follow_cores_and_local_world_size(monkeypatch):
    from imdpipe.launch import available_cores
    from imdpipe.train.config import TrainConfig

    cores = available_cores()
    assert TrainConfig().num_workers == -1  # the default: this process's share of the cores
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert loader_workers(-1) == cores and loader_workers(3) == 3 and loader_workers(0) == 0
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert loader_workers(-1) == max(1, cores // 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(4 * cores))
    assert loader_workers(-1) == 1
    kw = loader_kwargs(3, pin_memory=True)
    assert kw["num_workers"] == 3 and kw["persistent_workers"] and kw["prefetch_factor"] == 4 and kw["pin_memory"]
    assert loader_kwargs(0) == {"num_workers": 0, "pin_memory": False}  # no worker options without workers


def test_workers_decode_on_one_thread():
    cv2.setNumThreads(4)
    loader = DataLoader(_Threads(), batch_size=None, **loader_kwargs(1))
    assert [t.tolist() for t in loader] == [[1, 1], [1, 1]]


def test_a_loader_built_once_gives_every_epoch_its_own_clips(cache):
    """Persistent workers never see set_epoch on the dataset: the epoch rides with each index."""
    info = open_cache(cache, audio=True, relevance=True)
    ds = ClipDataset(info, select_videos(info, "train").indices, num_frames=4, frame_stride=1, crop_size=16)
    sampler = DistributedSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=3)
    loader = DataLoader(ds, batch_size=len(ds), sampler=EpochSampler(sampler), **loader_kwargs(2))
    seen = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        (batch,) = list(loader)
        order = list(sampler)
        ds.set_epoch(epoch)  # the same clips drawn directly in this process
        direct = torch.stack([ds[i]["rgb"] for i in order])
        assert torch.equal(batch["rgb"], direct), epoch
        seen.append(batch["rgb"])
    assert not torch.equal(seen[0], seen[1]) and not torch.equal(seen[1], seen[2])
    assert loader._iterator is not None and loader._iterator._persistent_workers  # the same workers throughout


def test_resume_with_persistent_workers_ends_with_same_weights(cache, tmp_path):
    cfg = tiny_config(epochs=2, fusion="gmu", val_split="last", num_workers=2)
    full = train(cache=cache, out=tmp_path / "full", config=cfg, show_progress=False)
    train(cache=cache, out=tmp_path / "part", config=cfg, show_progress=False, stop_after_epoch=0)
    resumed = train(cache=cache, out=tmp_path / "part", resume=True, show_progress=False)
    assert full["weights_sha256"] == resumed["weights_sha256"]
    a = torch.load(tmp_path / "full" / "checkpoint-last.pt", map_location="cpu", weights_only=False)["model"]
    b = torch.load(tmp_path / "part" / "checkpoint-last.pt", map_location="cpu", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert np.isfinite(full["final_train_loss"])
