"""Checkpoint sources: one read-only contract over every checkpoint format, tensors read lazily one at a time.

A source exposes ``keys()``, ``shape(key)``, ``dtype(key)`` and ``get_tensor(key, device)``, and says where it lies
on disk: ``root()`` (the file or model folder it was opened from), ``files()`` (the files it reads) and
``location(key)`` (a key's byte range, where the format says). Shapes and dtypes come from file headers where the
format has them (safetensors), so planning a merge reads no tensor data.

Formats:
    - :class:`StateDictSource`: an in-memory ``{key: Tensor}``.
    - :class:`SafetensorsSource`: one ``.safetensors`` file; each tensor is read from the file with explicit
      reads, every byte checked against the header (a file truncated during the merge is an error, not SIGBUS).
    - :class:`TorchFileSource`: a Lightning ``.ckpt`` (its ``"state_dict"``), or a plain ``torch.save`` state
      dict such as ``pytorch_model.bin``, loaded with ``weights_only=True`` (and ``mmap=True`` for zip files,
      whose storages are checked against the zip directory and read with explicit reads): a file that needs
      arbitrary code to unpickle is refused, never executed; a file that is neither a zip nor a pickle is refused
      by its first bytes.
    - :class:`HFFolderSource`: a Hugging Face model folder (``model.safetensors``, sharded safetensors with
      ``model.safetensors.index.json``, or ``pytorch_model.bin`` with or without its index); every file it reads
      stays inside the folder.

Key prefixes: ``prefix="model."`` exposes the keys that start with ``model.`` without it and hides the
others (a LightningModule's ``self.model`` sub-module); ``add_prefix="model."`` prepends it to every exposed
key. Both can be combined (strip, then add). :func:`open_source` detects the format.

The contract lives in :mod:`~lightning_merge.io.protocol` and the on-disk formats in
:mod:`~lightning_merge.io.formats`; this module holds the in-memory and renamed sources and :func:`open_source`, and
re-exports the rest.

Example:
    >>> src = open_source({"model.w": torch.ones(2, 3), "loss.pos_weight": torch.ones(1)}, prefix="model.")
    >>> src.keys(), src.shape("w"), src.dtype("w")
    (['w'], (2, 3), torch.float32)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_merge.io.formats import (
    HF_BIN,
    HF_BIN_INDEX,
    HF_SAFETENSORS,
    HF_SAFETENSORS_INDEX,
    SAFETENSORS_DTYPES,
    HFFolderSource,
    SafetensorsSource,
    TorchFileSource,
    torch_load_weights,
)
from lightning_merge.io.protocol import CheckpointSource, MappedSource

__all__ = [
    "HF_BIN",
    "HF_BIN_INDEX",
    "HF_SAFETENSORS",
    "HF_SAFETENSORS_INDEX",
    "SAFETENSORS_DTYPES",
    "CheckpointSource",
    "HFFolderSource",
    "PrefixedSource",
    "SafetensorsSource",
    "StateDictSource",
    "TorchFileSource",
    "open_source",
    "torch_load_weights",
]


def _check_state_dict(state: Mapping[str, Any], name: str) -> None:
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, Tensor):
            raise TypeError(
                f"Expected checkpoint {name!r} to map str keys to tensors, but key {key!r} holds a"
                f" {type(value).__name__}."
            )


class StateDictSource(MappedSource):
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


class PrefixedSource(MappedSource):
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

    def files(self) -> list[Path]:
        return self.source.files()

    def root(self) -> Path | None:
        return self.source.root()

    def _location(self, stored: str) -> tuple[Path, int, int] | None:
        return self.source.location(stored)


def _open_path(path: Path, argument: str) -> Callable[..., MappedSource]:
    if path.is_dir():
        return HFFolderSource
    if not path.exists():
        raise FileNotFoundError(
            f"Expected argument `{argument}` to be an existing checkpoint file or model folder, but got"
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
        label: the name of an in-memory state dict in messages (default ``"<state_dict>"``), and the argument named
            when a path does not exist (``"finetuned[1]"``; default ``"src"``).

    Raises:
        FileNotFoundError: ``src`` is a path that does not exist.
        ValueError: an unreadable file, a pickle that needs code to load, or a prefix that matches no key.
        TypeError: ``src`` of an unsupported type.
    """
    if isinstance(src, MappedSource | CheckpointSource) and not isinstance(src, Mapping):
        return PrefixedSource(src, prefix=prefix, add_prefix=add_prefix) if prefix or add_prefix else src
    if isinstance(src, Mapping):
        return StateDictSource(src, label or "<state_dict>", prefix=prefix, add_prefix=add_prefix)
    argument = label or "src"
    if not isinstance(src, str | os.PathLike):
        raise TypeError(
            f"Expected argument `{argument}` to be a path, a state dict or a CheckpointSource, but got"
            f" {type(src).__name__}."
        )
    return _open_path(Path(src), argument)(Path(src), prefix=prefix, add_prefix=add_prefix)
