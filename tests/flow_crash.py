"""A pool task for tests: its worker process dies on a video named ``*crash*`` (like a decoder crash)."""

import os
from pathlib import Path

from imdpipe.pipeline.flow import extract_shard


def crashing_extract_shard(store_path, start, stop, indices, paths, settings):
    if any("crash" in Path(p).name for p in paths):
        os._exit(3)
    return extract_shard(store_path, start, stop, indices, paths, settings)
