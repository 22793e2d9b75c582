"""Copy any imdpipe Zarr store (arrays, groups and attrs) into one HDF5 file, for tools that want one file.

Mapping:

* every Zarr array becomes an HDF5 dataset at the same path with the same shape and dtype,
  chunked like the Zarr chunks; string arrays become UTF-8 variable-length strings
  (``h5py.string_dtype()``); copied one block of chunks at a time, so a store larger than
  memory exports fine;
* every attribute is copied; numbers, strings, booleans and flat lists of numbers or strings
  stay native HDF5 attributes, anything else (dicts, nested lists, None, mixed lists) is
  stored as its JSON text and its name is listed in the object's ``_json_attrs`` attribute;
* the file is written beside ``out_h5`` and renamed into place at the end, so a crash never
  leaves a half-written export under the final name.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import zarr

JSON_ATTRS = "_json_attrs"


def _native(value) -> bool:
    if isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, list) and value:
        kinds = {type(v) for v in value}
        return kinds <= {str} or kinds <= {int, float} or kinds <= {bool}
    return False


def _copy_attrs(src: dict, dst) -> None:
    encoded = []
    for key, value in src.items():
        if _native(value):
            if isinstance(value, list) and isinstance(value[0], str):
                import h5py

                dst.attrs.create(key, np.array(value, dtype=object), dtype=h5py.string_dtype())
            else:
                dst.attrs[key] = value
        else:
            dst.attrs[key] = json.dumps(value)
            encoded.append(key)
    if encoded:
        dst.attrs[JSON_ATTRS] = json.dumps(sorted(encoded))


def _copy_array(arr: zarr.Array, parent, name: str, compression: str | None) -> None:
    import h5py

    is_str = arr.dtype.kind in ("U", "O", "T")
    dtype = h5py.string_dtype() if is_str else arr.dtype
    chunks = tuple(int(c) for c in arr.chunks) if arr.ndim and arr.size else None
    ds = parent.create_dataset(name, shape=arr.shape, dtype=dtype, chunks=chunks,
                               compression=compression if chunks else None)
    if arr.size:
        # A block of whole shards (or chunks) along the first axis at a time.
        step = int((arr.shards or arr.chunks)[0]) if arr.ndim else 1
        if arr.ndim == 0:
            value = arr[()]
            ds[()] = str(value) if is_str else value
        else:
            for start in range(0, arr.shape[0], step):
                block = np.asarray(arr[start:start + step])
                ds[start:start + step] = block.astype(object) if is_str else block
    _copy_attrs(dict(arr.attrs), ds)


def _copy_group(group: zarr.Group, dst, compression: str | None) -> None:
    _copy_attrs(dict(group.attrs), dst)
    for name, member in sorted(group.members()):
        if isinstance(member, zarr.Group):
            _copy_group(member, dst.create_group(name), compression)
        else:
            _copy_array(member, dst, name, compression)


def export_store(store, out_h5: str | Path, *, overwrite: bool = False, compression: str | None = None) -> Path:
    """Copy a store's arrays and attrs (recursively) into the HDF5 file ``out_h5``.

    Args:
        store: a store path (``CACHE/audio.zarr``), a ``zarr.Group`` or a ``StageStore``.
        out_h5: the HDF5 file to write.
        overwrite: replace an existing ``out_h5`` (refused otherwise).
        compression: h5py compression filter for the datasets (``"gzip"``, ``"lzf"``; default none).

    Returns:
        The path written.
    """
    import h5py

    out_h5 = Path(out_h5)
    if hasattr(store, "group") and isinstance(store.group, zarr.Group):
        group = store.group
    elif isinstance(store, zarr.Group):
        group = store
    else:
        path = Path(store)
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist: pass the .zarr directory of a built store.")
        group = zarr.open_group(path, mode="r")
    if out_h5.exists() and not overwrite:
        raise FileExistsError(f"{out_h5} exists; pass --overwrite to replace it.")
    out_h5.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_h5.with_name(out_h5.name + f".tmp-{os.getpid()}")
    try:
        with h5py.File(tmp, "w") as f:
            _copy_group(group, f, compression)
        tmp.replace(out_h5)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out_h5


def read_h5_attrs(obj) -> dict:
    """Attributes of an exported HDF5 object with the JSON-encoded ones decoded back."""
    encoded = set(json.loads(obj.attrs.get(JSON_ATTRS, "[]")))
    out = {}
    for key, value in obj.attrs.items():
        if key == JSON_ATTRS:
            continue
        if key in encoded:
            out[key] = json.loads(value)
        elif isinstance(value, np.ndarray):
            out[key] = [v.decode() if isinstance(v, bytes) else v for v in value.tolist()]
        elif isinstance(value, bytes):
            out[key] = value.decode()
        elif isinstance(value, np.generic):
            out[key] = value.item()
        else:
            out[key] = value
    return out
