"""The source contract: :class:`CheckpointSource`, and the key renaming shared by every concrete source.

A source is a named, read-only mapping from keys to lazily loaded tensors that also says where it lies on disk
(``root()``, ``files()``, ``location(key)``). :class:`MappedSource` implements the contract's bookkeeping once: the
``prefix``/``add_prefix`` renaming of keys and errors that name the checkpoint; a format supplies only
``_shape``, ``_dtype``, ``_read`` (and, on disk, ``files``, ``root`` and ``_location``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from lightning_merge.functional._checks import Fix, HintedError

__all__ = ["CheckpointSource", "Device", "MappedSource"]

Device = torch.device | str | None


@runtime_checkable
class CheckpointSource(Protocol):
    """What the engine reads: a named, read-only mapping from keys to lazily loaded tensors, and where it lies on disk.

    ``root()`` and ``files()`` let a merge refuse an output that would overwrite an input and record the inputs'
    sizes and hashes; ``location(key)`` lets the hashes trail the merge's reads. An in-memory source returns
    ``None``, ``[]`` and ``None``.
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

    def location(self, key: str) -> tuple[Path, int, int] | None:
        """Where the bytes of ``key`` lie: ``(file, begin, end)`` byte offsets, or ``None`` where the format does
        not say (pickled checkpoints, in-memory state dicts)."""

    def files(self) -> list[Path]:
        """The checkpoint files this source reads (for the record's sizes and hashes); empty in memory."""

    def root(self) -> Path | None:
        """The file or model folder this source was opened from, which an output must stay out of; ``None`` in
        memory."""


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
            raise HintedError(
                f"Expected some keys of {name!r} to start with prefix {prefix!r}, but none do (first keys:"
                f" {stored[:3]}).", "drop {0} or check its spelling, including the trailing dot", [Fix("prefix")]
            )
    if add_prefix:
        mapping = {add_prefix + k: v for k, v in mapping.items()}
    return mapping


class MappedSource:
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

    def files(self) -> list[Path]:
        """The checkpoint files this source reads; empty in memory."""
        return []

    def root(self) -> Path | None:
        """The file or model folder this source was opened from; ``None`` in memory."""
        return None

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
