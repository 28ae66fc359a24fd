"""Checkpoint formats on disk: safetensors files, torch files (Lightning ``.ckpt``, ``pytorch_model.bin``) and
Hugging Face model folders, each a :class:`~lightning_merge.io.protocol.MappedSource`.

Every tensor is read with explicit reads (``readinto``) into memory the caller owns, never by touching a memory map
of the input: a file truncated by another process while the merge runs is a ``ValueError`` naming the file and the
key, not a ``SIGBUS`` that kills the process, and every read is checked to return the bytes the file's header (the
safetensors header, or the zip directory of a torch file) promised. Torch files are loaded with ``weights_only=True``
(a file that needs code to unpickle is refused, never executed); a folder opens its shards lazily, one source each,
and refuses an index or a link that names a file outside it.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

from lightning_merge.io.hf import folder_member
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

    ``get_tensor`` reads the tensor's bytes into a new tensor with explicit reads (:func:`read_exact`). A private
    memory map would save that copy, but a file truncated while it is mapped kills the process with ``SIGBUS`` when
    a page past the new end is touched, wherever that happens (in the merge's arithmetic, in another thread); a read
    instead returns short, which is an error naming the file and the key. The price is one copy of every byte read:
    from the page cache, on 2 busy cores with one torch thread, reading 0.96 GB took 0.27 s against 0.04 s for the
    maps (whose page faults then fall in the arithmetic), and a task-arithmetic merge of those inputs 1.71 s against
    1.17 s (medians of 6); the engine's prefetch thread does the copy while the previous key is merged, and for SVD
    methods or inputs read from disk the copy is a small part of the time.
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
        super().__init__(str(self.path), list(self._meta), prefix, add_prefix)

    def _shape(self, stored: str) -> tuple[int, ...]:
        return self._meta[stored][0]

    def _dtype(self, stored: str) -> torch.dtype:
        return self._meta[stored][1]

    def _read(self, stored: str) -> Tensor:
        shape, dtype = self._meta[stored]
        begin, end = self._offsets[stored]
        tensor = torch.empty(shape, dtype=dtype)
        if tensor.nbytes != end - begin:  # safetensors checks this at open; a guard against a header that lies
            raise ValueError(f"Key {stored!r} of {str(self.path)!r} has {end - begin} bytes for shape {shape}.")
        read_exact(self.path, self._data_start + begin, tensor, stored)
        return tensor

    def files(self) -> list[Path]:
        return [self.path]

    def root(self) -> Path:
        return self.path

    def _location(self, stored: str) -> tuple[Path, int, int]:
        begin, end = self._offsets[stored]
        return self.path, self._data_start + begin, self._data_start + end


def read_exact(path: Path, start: int, tensor: Tensor, key: str) -> Tensor:
    """Fill the contiguous ``tensor`` with the bytes of ``path`` from offset ``start``, by explicit reads.

    Raises:
        ValueError: the file ends before the tensor's last byte (truncated, or changed while the merge ran), naming
            the file and ``key``.
    """
    buffer = tensor.reshape(-1).view(torch.uint8).numpy().data  # a memoryview of the tensor itself
    end = start + len(buffer)
    with open(path, "rb", buffering=0) as f:
        size, done = os.fstat(f.fileno()).st_size, 0
        if size >= end:
            f.seek(start)
            while done < len(buffer) and (n := f.readinto(buffer[done:])):
                done += n
    if done < len(buffer):
        raise ValueError(
            f"Expected {str(path)!r} to hold the bytes {start}..{end} of key {key!r}, as its header says, but it"
            f" {'ends at ' + str(size) if size < end else 'returned only ' + str(done)} bytes: was it truncated or"
            " rewritten while the merge ran?"
        )
    return tensor


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


_ZIP_MAGIC, _PICKLE_MAGIC = b"PK\x03\x04", b"\x80"  # torch.save's zip format; a pickle of protocol 2 or later


def _torch_format(path: Path) -> str:
    """``"zip"`` or ``"pickle"`` from the file's first bytes; ``ValueError`` for anything else (a text file, HTML)."""
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:4] == _ZIP_MAGIC:
        return "zip"
    if head[:1] == _PICKLE_MAGIC:
        return "pickle"
    hint = (
        "it looks like a safetensors file (an 8-byte header length, then JSON): name it .safetensors"
        if head[8:9] == b"{"
        else "check that the file is what its name says (a download that saved an error page, a Git LFS pointer)"
    )
    raise ValueError(
        f"Could not read {str(path)!r} as a torch checkpoint: it starts with {head[:4]!r}, neither a zip archive"
        f" (torch.save) nor a pickle. HINT: {hint}."
    )


def torch_load_weights(path: Path) -> Any:
    """``torch.load`` with ``weights_only=True`` (``mmap=True`` when the file is in the zip format).

    Raises:
        ValueError: the file needs arbitrary code to unpickle (it is refused, nothing in it runs), or is not a
            torch file at all.
    """
    mmap = _torch_format(path) == "zip"
    try:
        return torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"Refusing to load {str(path)!r}: unpickling it would need code that is not a tensor or a plain"
            f" container"
            f" ({_unsafe_reason(err)}). It was not executed. HINT: re-save only the weights, e.g."
            " `torch.save(model.state_dict(), ...)` or safetensors, from code you trust."
        ) from None
    except Exception as err:  # torch raises RuntimeError, EOFError, KeyError, ... for files that are not its own
        raise ValueError(f"Could not read {str(path)!r} as a torch checkpoint: {_first_line(err)}") from None


def _zip_records(path: Path) -> dict[int, int]:
    """``{file offset of the data: size}`` of every tensor record (``<archive>/data/<key>``) of a torch zip file."""
    records = {}
    try:
        with zipfile.ZipFile(path) as archive, open(path, "rb") as f:
            for info in archive.infolist():
                if info.filename.split("/")[-2:-1] != ["data"]:
                    continue
                if info.compress_type != zipfile.ZIP_STORED:
                    raise ValueError(f"its record {info.filename!r} is compressed, which torch.save never does")
                f.seek(info.header_offset)
                local = f.read(30)  # the local file header: its name and extra field lengths are at 26 and 28
                if len(local) < 30 or local[:4] != _ZIP_MAGIC:
                    raise ValueError(f"the local header of its record {info.filename!r} is missing")
                name_len, extra_len = struct.unpack("<HH", local[26:30])
                records[info.header_offset + 30 + name_len + extra_len] = info.file_size
    except (OSError, zipfile.BadZipFile, ValueError) as err:
        raise ValueError(f"Could not read {str(path)!r} as a torch checkpoint: {_first_line(err)}") from None
    return records


def _storage_offsets(state: Mapping[str, Tensor], path: Path) -> dict[int, int]:
    """``{storage data_ptr: file offset}`` of the storages of a zip torch file loaded with ``mmap=True``, each
    checked to lie within its record of the zip archive.

    ``torch.load(mmap=True)`` maps the whole file and slices every storage out of that map at its record's offset,
    with the length the pickle claims, unchecked: a record shorter than its storage is merged from the bytes of the
    next records (a plain ``torch.load`` refuses it). Storages' pointers therefore differ by their records' offsets;
    the map's base is found as the one that puts every storage at the start of a record, and each storage must fit
    in its record. (Only public attributes are used: ``data_ptr``, ``nbytes`` and the zip directory.)

    Raises:
        ValueError: a storage that is longer than its record, or that starts at no record, naming the file.
    """
    storages = {s.data_ptr(): s.nbytes() for s in (t.untyped_storage() for t in state.values()) if s.nbytes()}
    records = _zip_records(path)
    if not storages:
        return {}
    first = min(storages)
    for start in sorted(records):
        base = first - start
        if all(records.get(ptr - base, -1) >= nbytes for ptr, nbytes in storages.items()):
            return {ptr: ptr - base for ptr in storages}
    raise ValueError(
        f"Could not read {str(path)!r} as a torch checkpoint: a tensor claims more bytes than its record in the zip"
        " archive holds (a corrupt or crafted file; torch.load without mmap refuses it too)."
    )


def _extract_state_dict(obj: Any, path: Path) -> Mapping[str, Tensor]:
    """The state dict inside a loaded torch file: a Lightning checkpoint's ``"state_dict"`` or the object
    itself."""
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()):
        found = sorted(obj, key=str)[:8] if isinstance(obj, Mapping) else type(obj).__name__
        raise ValueError(
            f"Expected {str(path)!r} to hold a state dict of tensors (str keys) or a Lightning checkpoint with a"
            f" 'state_dict', but found {found}."
        )
    return obj


class TorchFileSource(MappedSource):
    """A Lightning ``.ckpt`` (the ``"state_dict"`` inside) or a plain ``torch.save`` state dict
    (``pytorch_model.bin``).

    The file is loaded once, on first use, with ``weights_only=True``. A file whose unpickling would run arbitrary
    code is refused with a ``ValueError`` naming it; nothing in it is executed. ``.ckpt`` files with a
    ``"state_dict"`` entry are read as Lightning checkpoints, anything else must be a mapping of keys to tensors.

    Zip-format files (every ``torch.save`` since torch 1.6) are loaded with ``mmap=True``, so tensors stay on disk
    until read; every storage is checked to lie within its record of the archive (:func:`_storage_offsets`), and
    ``get_tensor`` reads the tensor's bytes from the file with explicit reads (:func:`read_exact`), never through
    the map (a file truncated meanwhile is an error, not ``SIGBUS``). Legacy pickle files are read into memory.
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
        self._offsets: dict[int, int] | None = None  # {storage data_ptr: file offset}; None for legacy files
        super().__init__(str(self.path), list(self._load()), prefix, add_prefix)

    def _load(self) -> Mapping[str, Tensor]:
        if self._state is None:
            state = _extract_state_dict(torch_load_weights(self.path), self.path)
            self._offsets = _storage_offsets(state, self.path) if _torch_format(self.path) == "zip" else None
            self._state = state
        return self._state

    def __getstate__(self) -> dict[str, Any]:
        # picklable for ddp_spawn: the loaded (memory-mapped) state is reopened lazily in the new process
        return {**self.__dict__, "_state": None, "_offsets": None}

    def files(self) -> list[Path]:
        return [self.path]

    def root(self) -> Path:
        return self.path

    def _shape(self, stored: str) -> tuple[int, ...]:
        return tuple(self._load()[stored].shape)

    def _dtype(self, stored: str) -> torch.dtype:
        return self._load()[stored].dtype

    def _read(self, stored: str) -> Tensor:
        tensor = self._load()[stored]
        if self._offsets is None or tensor.numel() == 0:
            return tensor.clone()  # in memory (legacy format), or no bytes to read
        # the bytes from the tensor's first element to its last, read from the file, then viewed with its strides
        itemsize, first = tensor.element_size(), int(tensor.storage_offset())
        span = 1 + sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride(), strict=True))
        raw = torch.empty(span * itemsize, dtype=torch.uint8)
        read_exact(self.path, self._offsets[tensor.untyped_storage().data_ptr()] + first * itemsize, raw, stored)
        if tensor.is_contiguous():
            return raw.view(tensor.dtype).view(tensor.shape)
        return torch.as_strided(raw.view(tensor.dtype), tensor.shape, tensor.stride()).contiguous()


def _file_source(path: Path) -> MappedSource:
    return SafetensorsSource(path) if path.suffix == ".safetensors" else TorchFileSource(path)


def _index_files(index: Path) -> dict[str, str]:
    """``{key: shard file name}`` from a Hugging Face ``*.index.json``, every name checked to stay inside the folder
    (:func:`~lightning_merge.io.hf.folder_member`) and to exist, before any tensor is read."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"Could not read the shard index {str(index)!r}: {_first_line(err)}") from None
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) for k in weight_map):
        raise ValueError(
            f"Expected `weight_map` of the shard index {str(index)!r} to map keys to file names, but got"
            f" {type(weight_map).__name__}."
        )
    for key, name in weight_map.items():
        folder_member(index.parent, name, f"key {key!r} of the shard index {str(index)!r}")
    missing = sorted({f for f in weight_map.values() if not (index.parent / f).is_file()})
    if missing:
        raise FileNotFoundError(f"Shard index {str(index)!r} names files that do not exist: {missing}.")
    return weight_map


class HFFolderSource(MappedSource):
    """A Hugging Face model folder: ``model.safetensors``, sharded safetensors with
    ``model.safetensors.index.json``, or ``pytorch_model.bin`` (with or without
    ``pytorch_model.bin.index.json``); safetensors are preferred.

    Shards are opened lazily, one source per file; keys keep the index's order. Every file it reads (named by the
    index or not) must lie inside the folder, links followed, except the Hugging Face cache's own links to its
    blobs (:func:`~lightning_merge.io.hf.folder_member`).
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
                return _index_files(folder_member(self.path, index, "the shard index"))
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
            self._files[name] = _file_source(folder_member(self.path, name, "a weights file"))
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
