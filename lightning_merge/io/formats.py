"""Checkpoint formats on disk: safetensors files, torch files (Lightning ``.ckpt``, ``pytorch_model.bin``) and
Hugging Face model folders, each a :class:`~lightning_merge.io.protocol.MappedSource`.

Safetensors tensors are private memory maps of the file (no copy); torch files are loaded with ``weights_only=True``
(a file that needs code to unpickle is refused, never executed); a folder opens its shards lazily, one source each.
"""

from __future__ import annotations

import json
import mmap
import os
import pickle
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

from lightning_merge.io.protocol import MappedSource

__all__ = ["HFFolderSource", "SafetensorsSource", "TorchFileSource", "torch_load_weights"]

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}

HF_SAFETENSORS = "model.safetensors"
HF_SAFETENSORS_INDEX = "model.safetensors.index.json"
HF_BIN = "pytorch_model.bin"
HF_BIN_INDEX = "pytorch_model.bin.index.json"


def _existing_file(path: str | os.PathLike, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        state = "a folder" if path.is_dir() else "not found"
        raise FileNotFoundError(
            f"Expected argument `path` to be an existing {what} file, but got {str(path)!r} ({state})."
        )
    return path


class SafetensorsSource(MappedSource):
    """One ``.safetensors`` file. Shapes and dtypes come from its header (validated by ``safetensors`` once).

    ``get_tensor`` returns a private copy-on-write memory map of the tensor's bytes (``MAP_PRIVATE`` through
    ``torch.UntypedStorage.from_file``): nothing is copied until the caller writes, a write never reaches the
    file, and the mapping lives exactly as long as the tensor, so reading every key of a large file keeps only
    the tensors still referenced resident. Reading a tensor is thus the page-cache (or disk) read itself, with
    no extra pass to copy it out. Tensors whose offset is not a multiple of their element size (files from
    before safetensors aligned its data) are copied out instead.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        prefix: str | None = None,
        add_prefix: str | None = None,
    ) -> None:
        self.path = _existing_file(path, ".safetensors")
        self._meta, self._data_start, self._offsets = _read_safetensors_header(self.path)
        self._size = self.path.stat().st_size
        super().__init__(str(self.path), list(self._meta), prefix, add_prefix)

    def _shape(self, stored: str) -> tuple[int, ...]:
        return self._meta[stored][0]

    def _dtype(self, stored: str) -> torch.dtype:
        return self._meta[stored][1]

    def _read(self, stored: str) -> Tensor:
        shape, dtype = self._meta[stored]
        begin, end = self._offsets[stored]
        start = self._data_start + begin
        if end == begin or start % dtype.itemsize:
            with safe_open(str(self.path), framework="pt") as f:
                return f.get_tensor(stored)
        storage = torch.UntypedStorage.from_file(str(self.path), shared=False, nbytes=self._size)
        tensor = torch.empty(0, dtype=dtype).set_(storage, start // dtype.itemsize, shape)  # type: ignore[call-overload]
        _read_ahead(self.path, start, end - begin, tensor)
        return tensor

    def files(self) -> list[Path]:
        return [self.path]

    def root(self) -> Path:
        return self.path

    def _location(self, stored: str) -> tuple[Path, int, int]:
        begin, end = self._offsets[stored]
        return self.path, self._data_start + begin, self._data_start + end


def _read_ahead(path: Path, start: int, length: int, tensor: Tensor) -> None:
    """Start reading the tensor's bytes from disk now, in the calling thread (the engine's prefetch thread),
    so that its first arithmetic finds them in the page cache.

    ``posix_fadvise(WILLNEED)`` queues the reads and returns; pages already cached cost nearly nothing, and
    the page tables are left to the arithmetic (its threads fault them in parallel: touching every page here
    instead made task arithmetic of cached files 15-18% slower on 2 cores). Without ``posix_fadvise`` (macOS,
    Windows) every page is touched here.
    """
    if hasattr(os, "posix_fadvise"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, start, length, os.POSIX_FADV_WILLNEED)
        finally:
            os.close(fd)
    else:  # pragma: no cover - not Linux
        tensor.reshape(-1).view(torch.uint8)[:: mmap.PAGESIZE].sum()


def _read_safetensors_header(
    path: Path,
) -> tuple[dict[str, tuple[tuple[int, ...], torch.dtype]], int, dict[str, tuple[int, int]]]:
    """``{key: (shape, dtype)}`` in the file's key order, the byte offset of the data section, and
    ``{key: (begin, end)}`` within it. ``safetensors`` validates the file first (offsets, sizes, overlaps)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except Exception as err:  # safetensors raises its own SafetensorError for malformed files
        raise ValueError(f"Could not read {str(path)!r} as a safetensors file: {_first_line(err)}") from None
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    meta = {k: (tuple(header[k]["shape"]), _torch_dtype(header[k]["dtype"], k, path)) for k in keys}
    return meta, 8 + length, {k: tuple(header[k]["data_offsets"]) for k in keys}


def _torch_dtype(name: str, key: str, path: Path) -> torch.dtype:
    if name not in SAFETENSORS_DTYPES:
        raise ValueError(
            f"Key {key!r} of {str(path)!r} has safetensors dtype {name}, which lightning-merge does not read."
        )
    return SAFETENSORS_DTYPES[name]


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def _unsafe_reason(err: BaseException) -> str:
    """The line of a ``weights_only`` failure that names the refused global, else its first line."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    named = [line for line in lines if "GLOBAL" in line or "Unsupported" in line]
    return (named or lines or [type(err).__name__])[0]


def torch_load_weights(path: Path) -> Any:
    """``torch.load`` with ``weights_only=True`` (``mmap=True`` when the file is in the zip format).

    Raises:
        ValueError: the file needs arbitrary code to unpickle (it is refused, nothing in it runs), or is not a
            torch file at all.
    """
    try:
        try:
            return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format: no mmap
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"Refusing to load {str(path)!r}: unpickling it would need code that is not a tensor or a plain"
            f" container"
            f" ({_unsafe_reason(err)}). It was not executed. HINT: re-save only the weights, e.g."
            " `torch.save(model.state_dict(), ...)` or safetensors, from code you trust."
        ) from None
    except (RuntimeError, EOFError) as err:
        raise ValueError(f"Could not read {str(path)!r} as a torch checkpoint: {_first_line(err)}") from None


def _extract_state_dict(obj: Any, path: Path) -> Mapping[str, Tensor]:
    """The state dict inside a loaded torch file: a Lightning checkpoint's ``"state_dict"`` or the object
    itself."""
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        found = sorted(map(str, obj))[:8] if isinstance(obj, Mapping) else type(obj).__name__
        raise ValueError(
            f"Expected {str(path)!r} to hold a state dict of tensors or a Lightning checkpoint with a"
            f" 'state_dict',"
            f" but found {found}."
        )
    return obj


class TorchFileSource(MappedSource):
    """A Lightning ``.ckpt`` (the ``"state_dict"`` inside) or a plain ``torch.save`` state dict
    (``pytorch_model.bin``).

    The file is loaded once, on first use, with ``weights_only=True`` and ``mmap=True`` (zip-format files), so
    tensors stay on disk until read. A file whose unpickling would run arbitrary code is refused with a
    ``ValueError`` naming it; nothing in it is executed. ``.ckpt`` files with a ``"state_dict"`` entry are
    read as Lightning checkpoints, anything else must be a mapping of keys to tensors.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        prefix: str | None = None,
        add_prefix: str | None = None,
    ) -> None:
        self.path = _existing_file(path, "torch checkpoint")
        self._state: Mapping[str, Tensor] | None = None
        super().__init__(str(self.path), list(self._load()), prefix, add_prefix)

    def _load(self) -> Mapping[str, Tensor]:
        if self._state is None:
            self._state = _extract_state_dict(torch_load_weights(self.path), self.path)
        return self._state

    def __getstate__(self) -> dict[str, Any]:
        # picklable for ddp_spawn: the loaded (memory-mapped) state is reopened lazily in the new process
        return {**self.__dict__, "_state": None}

    def files(self) -> list[Path]:
        return [self.path]

    def root(self) -> Path:
        return self.path

    def _shape(self, stored: str) -> tuple[int, ...]:
        return tuple(self._load()[stored].shape)

    def _dtype(self, stored: str) -> torch.dtype:
        return self._load()[stored].dtype

    def _read(self, stored: str) -> Tensor:
        # a copy, so that the caller never holds a view into the memory map of the input file
        return self._load()[stored].clone()


def _file_source(path: Path) -> MappedSource:
    return SafetensorsSource(path) if path.suffix == ".safetensors" else TorchFileSource(path)


def _index_files(index: Path) -> dict[str, str]:
    """``{key: shard file name}`` from a Hugging Face ``*.index.json``."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"Could not read the shard index {str(index)!r}: {_first_line(err)}") from None
    missing = sorted({f for f in weight_map.values() if not (index.parent / f).is_file()})
    if missing:
        raise FileNotFoundError(f"Shard index {str(index)!r} names files that do not exist: {missing}.")
    return weight_map


class HFFolderSource(MappedSource):
    """A Hugging Face model folder: ``model.safetensors``, sharded safetensors with
    ``model.safetensors.index.json``, or ``pytorch_model.bin`` (with or without
    ``pytorch_model.bin.index.json``); safetensors are preferred.

    Shards are opened lazily, one source per file; keys keep the index's order.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        prefix: str | None = None,
        add_prefix: str | None = None,
    ) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(
                f"Expected argument `path` to be an existing model folder, but got {str(path)!r}."
            )
        self._files: dict[str, MappedSource] = {}
        self._where = self._layout()
        super().__init__(str(self.path), list(self._where), prefix, add_prefix)

    def _layout(self) -> dict[str, str]:
        for index in (HF_SAFETENSORS_INDEX, HF_BIN_INDEX):
            if (self.path / index).is_file():
                return _index_files(self.path / index)
        for single in (HF_SAFETENSORS, HF_BIN):
            if (self.path / single).is_file():
                return dict.fromkeys(self._file(single).keys(), single)
        raise FileNotFoundError(
            f"Expected folder {str(self.path)!r} to hold {HF_SAFETENSORS}, {HF_SAFETENSORS_INDEX}, {HF_BIN}"
            f" or"
            f" {HF_BIN_INDEX}, but found none. HINT: pass a single checkpoint file directly."
        )

    def _file(self, name: str) -> MappedSource:
        if name not in self._files:
            self._files[name] = _file_source(self.path / name)
        return self._files[name]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_files": {}}

    def files(self) -> list[Path]:
        """The checkpoint files this folder reads (its shards, or its single file)."""
        return [self.path / name for name in dict.fromkeys(self._where.values())]

    def root(self) -> Path:
        return self.path

    def _shape(self, stored: str) -> tuple[int, ...]:
        return self._file(self._where[stored]).shape(stored)

    def _dtype(self, stored: str) -> torch.dtype:
        return self._file(self._where[stored]).dtype(stored)

    def _read(self, stored: str) -> Tensor:
        return self._file(self._where[stored]).get_tensor(stored)

    def _location(self, stored: str) -> tuple[Path, int, int] | None:
        return self._file(self._where[stored]).location(stored)
