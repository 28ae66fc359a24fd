"""Checkpoint sources: one read-only contract over every checkpoint format, tensors read lazily one at a time.

A source exposes ``keys()``, ``shape(key)``, ``dtype(key)`` and ``get_tensor(key, device)``. Shapes and dtypes
come from file headers where the format has them (safetensors), so planning a merge reads no tensor data.

Formats:
    - :class:`StateDictSource`: an in-memory ``{key: Tensor}``.
    - :class:`SafetensorsSource`: one ``.safetensors`` file; each tensor is a private memory map of its bytes
      that lives as long as the tensor (no copy).
    - :class:`TorchFileSource`: a Lightning ``.ckpt`` (its ``"state_dict"``), or a plain ``torch.save`` state
      dict such as ``pytorch_model.bin``, loaded with ``weights_only=True`` (and ``mmap=True`` when the file
      allows): a file that needs arbitrary code to unpickle is refused, never executed.
    - :class:`HFFolderSource`: a Hugging Face model folder (``model.safetensors``, sharded safetensors with
      ``model.safetensors.index.json``, or ``pytorch_model.bin`` with or without its index).

Key prefixes: ``prefix="model."`` exposes the keys that start with ``model.`` without it and hides the
others (a LightningModule's ``self.model`` sub-module); ``add_prefix="model."`` prepends it to every exposed
key. Both can be combined (strip, then add). :func:`open_source` detects the format.

Example:
    >>> src = open_source({"model.w": torch.ones(2, 3), "loss.pos_weight": torch.ones(1)}, prefix="model.")
    >>> src.keys(), src.shape("w"), src.dtype("w")
    (['w'], (2, 3), torch.float32)
"""

from __future__ import annotations

import json
import mmap
import os
import pickle
import struct
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from safetensors import safe_open
from torch import Tensor

__all__ = [
    "CheckpointSource",
    "HFFolderSource",
    "PrefixedSource",
    "SafetensorsSource",
    "StateDictSource",
    "TorchFileSource",
    "open_source",
]

Device = torch.device | str | None

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


@runtime_checkable
class CheckpointSource(Protocol):
    """What the engine reads: a named, read-only mapping from keys to lazily loaded tensors.

    The sources of this module also have ``location(key)``, the file and byte range of a key where the format
    says (safetensors); it is optional (the engine uses it, when present, to let the record's hashes trail its
    reads).
    """

    name: str

    def keys(self) -> list[str]:
        """Every key, in a stable order (the checkpoint's, or sorted for safetensors files)."""

    def shape(self, key: str) -> tuple[int, ...]:
        """The shape of ``key``, without loading the tensor where the format allows."""

    def dtype(self, key: str) -> torch.dtype:
        """The dtype of ``key``, without loading the tensor where the format allows."""

    def get_tensor(self, key: str, device: Device = None) -> Tensor:
        """The tensor of ``key`` on ``device`` (CPU when ``None``); the caller owns it."""


def _key_map(stored: list[str], prefix: str | None, add_prefix: str | None, name: str) -> dict[str, str]:
    """``{exposed key: stored key}`` after stripping ``prefix`` (keys without it are hidden) and adding
    ``add_prefix``."""
    for arg, value in (("prefix", prefix), ("add_prefix", add_prefix)):
        if value is not None and not isinstance(value, str):
            raise TypeError(f"Expected argument `{arg}` to be a str or None, but got {type(value).__name__}.")
    mapping = {k: k for k in stored}
    if prefix:
        mapping = {k[len(prefix) :]: k for k in stored if k.startswith(prefix)}
        if not mapping:
            raise ValueError(
                f"Expected some keys of {name!r} to start with prefix {prefix!r}, but none do (first keys:"
                f" {stored[:3]}). HINT: drop `prefix` or check its spelling, including the trailing dot."
            )
    if add_prefix:
        mapping = {add_prefix + k: v for k, v in mapping.items()}
    return mapping


class _MappedSource:
    """Shared behaviour of the concrete sources: key renaming and error messages that name the checkpoint."""

    name: str

    def __init__(self, name: str, stored_keys: list[str], prefix: str | None, add_prefix: str | None) -> None:
        self.name = name
        self._map = _key_map(stored_keys, prefix, add_prefix, name)

    def keys(self) -> list[str]:
        return list(self._map)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._shape(self._stored(key)))

    def dtype(self, key: str) -> torch.dtype:
        return self._dtype(self._stored(key))

    def get_tensor(self, key: str, device: Device = None) -> Tensor:
        tensor = self._read(self._stored(key))
        return tensor if device is None else tensor.to(device)

    def location(self, key: str) -> tuple[Path, int, int] | None:
        """Where the bytes of ``key`` lie: ``(file, begin, end)`` byte offsets, or ``None`` where the format
        does not say (pickled checkpoints, in-memory state dicts)."""
        return self._location(self._stored(key))

    def _location(self, stored: str) -> tuple[Path, int, int] | None:
        return None

    def __contains__(self, key: object) -> bool:
        return key in self._map

    def __len__(self) -> int:
        return len(self._map)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, keys={len(self._map)})"

    def _stored(self, key: str) -> str:
        if key not in self._map:
            raise KeyError(f"Key {key!r} is not in checkpoint {self.name!r} ({len(self._map)} keys).")
        return self._map[key]

    def _shape(self, stored: str) -> tuple[int, ...]:
        raise NotImplementedError

    def _dtype(self, stored: str) -> torch.dtype:
        raise NotImplementedError

    def _read(self, stored: str) -> Tensor:
        raise NotImplementedError


def _check_state_dict(state: Mapping[str, Any], name: str) -> None:
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, Tensor):
            raise TypeError(
                f"Expected checkpoint {name!r} to map str keys to tensors, but key {key!r} holds a"
                f" {type(value).__name__}."
            )


class StateDictSource(_MappedSource):
    """An in-memory state dict ``{key: Tensor}``, labelled ``label`` in error messages.

    ``get_tensor`` returns the stored tensor itself when no ``device`` is given (no copy): callers must
    not modify it.

    Example:
        >>> src = StateDictSource({"w": torch.zeros(2)}, label="base", add_prefix="model.")
        >>> src.keys(), src.get_tensor("model.w")
        (['model.w'], tensor([0., 0.]))
    """

    def __init__(
        self,
        state: Mapping[str, Tensor],
        label: str = "<state_dict>",
        *,
        prefix: str | None = None,
        add_prefix: str | None = None,
    ) -> None:
        if not isinstance(state, Mapping):
            raise TypeError(
                f"Expected argument `state` to be a mapping of str to Tensor, but got {type(state).__name__}."
            )
        _check_state_dict(state, label)
        self._state = state
        super().__init__(label, list(state), prefix, add_prefix)

    def _shape(self, stored: str) -> tuple[int, ...]:
        return tuple(self._state[stored].shape)

    def _dtype(self, stored: str) -> torch.dtype:
        return self._state[stored].dtype

    def _read(self, stored: str) -> Tensor:
        return self._state[stored]


def _existing_file(path: str | os.PathLike, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        state = "a folder" if path.is_dir() else "not found"
        raise FileNotFoundError(
            f"Expected argument `path` to be an existing {what} file, but got {str(path)!r} ({state})."
        )
    return path


class SafetensorsSource(_MappedSource):
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
        tensor = torch.empty(0, dtype=dtype).set_(storage, start // dtype.itemsize, shape)
        _read_ahead(self.path, start, end - begin, tensor)
        return tensor

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


class TorchFileSource(_MappedSource):
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

    def _shape(self, stored: str) -> tuple[int, ...]:
        return tuple(self._load()[stored].shape)

    def _dtype(self, stored: str) -> torch.dtype:
        return self._load()[stored].dtype

    def _read(self, stored: str) -> Tensor:
        # a copy, so that the caller never holds a view into the memory map of the input file
        return self._load()[stored].clone()


def _file_source(path: Path) -> _MappedSource:
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


class HFFolderSource(_MappedSource):
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
        self._files: dict[str, _MappedSource] = {}
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

    def _file(self, name: str) -> _MappedSource:
        if name not in self._files:
            self._files[name] = _file_source(self.path / name)
        return self._files[name]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_files": {}}

    def files(self) -> list[Path]:
        """The checkpoint files this folder reads (for hashing and sizes)."""
        return [self.path / name for name in dict.fromkeys(self._where.values())]

    def _shape(self, stored: str) -> tuple[int, ...]:
        return self._file(self._where[stored]).shape(stored)

    def _dtype(self, stored: str) -> torch.dtype:
        return self._file(self._where[stored]).dtype(stored)

    def _read(self, stored: str) -> Tensor:
        return self._file(self._where[stored]).get_tensor(stored)

    def _location(self, stored: str) -> tuple[Path, int, int] | None:
        return self._file(self._where[stored]).location(stored)


class PrefixedSource(_MappedSource):
    """Any :class:`CheckpointSource` with its keys renamed by ``prefix`` (stripped) and ``add_prefix``
    (added)."""

    def __init__(
        self,
        source: CheckpointSource,
        *,
        prefix: str | None = None,
        add_prefix: str | None = None,
    ) -> None:
        self.source = source
        super().__init__(source.name, list(source.keys()), prefix, add_prefix)

    def _shape(self, stored: str) -> tuple[int, ...]:
        return tuple(self.source.shape(stored))

    def _dtype(self, stored: str) -> torch.dtype:
        return self.source.dtype(stored)

    def _read(self, stored: str) -> Tensor:
        return self.source.get_tensor(stored)

    def _location(self, stored: str) -> tuple[Path, int, int] | None:
        return source_location(self.source, stored)


def source_location(source: CheckpointSource, key: str) -> tuple[Path, int, int] | None:
    """``source.location(key)`` where the source has it (it is optional), else ``None``."""
    location = getattr(source, "location", None)
    return location(key) if location is not None else None


def source_files(source: CheckpointSource) -> list[Path]:
    """The files a source reads from disk (empty for in-memory sources)."""
    if isinstance(source, PrefixedSource):
        return source_files(source.source)
    if isinstance(source, HFFolderSource):
        return source.files()
    path = getattr(source, "path", None)
    return [Path(path)] if isinstance(path, str | os.PathLike) and Path(path).is_file() else []


def _open_path(path: Path) -> Callable[..., _MappedSource]:
    if path.is_dir():
        return HFFolderSource
    if not path.exists():
        raise FileNotFoundError(
            f"Expected argument `src` to be an existing checkpoint file or model folder, but got"
            f" {str(path)!r}"
            " (not found)."
        )
    return SafetensorsSource if path.suffix == ".safetensors" else TorchFileSource


def open_source(
    src: str | os.PathLike | Mapping[str, Tensor] | CheckpointSource,
    *,
    prefix: str | None = None,
    add_prefix: str | None = None,
    label: str | None = None,
) -> CheckpointSource:
    """Open any supported checkpoint as a :class:`CheckpointSource`, detecting its format.

    Args:
        src: a folder (Hugging Face layout), a ``.safetensors`` file, any other file (read with
            ``torch.load``, ``weights_only=True``: Lightning ``.ckpt``, ``pytorch_model.bin``, ``torch.save``
            state dicts), an in-memory state dict, or a source (returned as is unless a prefix is given).
        prefix: strip this prefix, e.g. ``"model."``; keys without it are hidden.
        add_prefix: prepend this prefix to every key (after stripping ``prefix``).
        label: the name of an in-memory state dict in messages (default ``"<state_dict>"``).

    Raises:
        FileNotFoundError: ``src`` is a path that does not exist.
        ValueError: an unreadable file, a pickle that needs code to load, or a prefix that matches no key.
        TypeError: ``src`` of an unsupported type.
    """
    if isinstance(src, _MappedSource | CheckpointSource) and not isinstance(src, Mapping):
        return PrefixedSource(src, prefix=prefix, add_prefix=add_prefix) if prefix or add_prefix else src
    if isinstance(src, Mapping):
        return StateDictSource(src, label or "<state_dict>", prefix=prefix, add_prefix=add_prefix)
    if not isinstance(src, str | os.PathLike):
        raise TypeError(
            "Expected argument `src` to be a path, a state dict or a CheckpointSource, but got"
            f" {type(src).__name__}."
        )
    return _open_path(Path(src))(Path(src), prefix=prefix, add_prefix=add_prefix)
