"""Streaming safetensors writer: tensors are written one at a time, so a merge never holds its whole output.

The layout (which key goes to which shard, and where) is fixed up front from the keys' shapes and dtypes; each
shard's header is written first and every tensor's bytes are appended as it arrives. Files follow the
safetensors format (an 8-byte little-endian header size, a JSON header padded to 8 bytes, the raw
little-endian data) with ``{"format": "pt"}`` metadata so ``transformers`` loads them. Above
``max_shard_size`` bytes the output is sharded as ``model-00001-of-0000N.safetensors`` with a Hugging Face
``model.safetensors.index.json``.

:class:`ShardLayout` is the same layout as byte offsets, for writers that do not write in order: several processes
of one merge (``torchrun``) each write their own tensors at their places in files created once
(:meth:`ShardLayout.create`, :func:`write_placed`), and the bytes are those :class:`SafetensorsWriter` writes.

Example:
    >>> import tempfile
    >>> from lightning_merge.io import open_source
    >>> folder = tempfile.mkdtemp()
    >>> save_state_dict({"w": torch.ones(2, 2), "b": torch.zeros(2)}, folder)
    ['model.safetensors']
    >>> open_source(folder).get_tensor("w")
    tensor([[1., 1.],
            [1., 1.]])
"""

from __future__ import annotations

import json
import os
import struct
import sys
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch
from torch import Tensor

from lightning_merge.functional._checks import check_positive_int, numel
from lightning_merge.io.sources import HF_SAFETENSORS, HF_SAFETENSORS_INDEX, SAFETENSORS_DTYPES

__all__ = ["SafetensorsWriter", "ShardLayout", "TensorSpec", "plan_shards", "save_state_dict", "write_placed"]

_DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
DEFAULT_MAX_SHARD_SIZE = 5 * 2**30


@dataclass(frozen=True)
class TensorSpec:
    """The key, shape and dtype of one tensor to write."""

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return numel(self.shape) * self.dtype.itemsize


def plan_shards(
    specs: Sequence[TensorSpec],
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
) -> list[list[TensorSpec]]:
    """Split ``specs`` in order into shards of at most ``max_shard_size`` bytes (a larger tensor gets its
    own)."""
    check_positive_int("max_shard_size", max_shard_size, unit="bytes")
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def shard_names(num_shards: int) -> list[str]:
    """``model.safetensors`` for one shard, else the Hugging Face ``model-0000i-of-0000N.safetensors``
    names."""
    if num_shards == 1:
        return [HF_SAFETENSORS]
    return [f"model-{i:05d}-of-{num_shards:05d}.safetensors" for i in range(1, num_shards + 1)]


def _header(specs: Sequence[TensorSpec], metadata: Mapping[str, str]) -> bytes:
    entries: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for spec in specs:
        if spec.dtype not in _DTYPE_NAMES:
            raise ValueError(f"Key {spec.key!r} has dtype {spec.dtype}, which safetensors cannot store.")
        entries[spec.key] = {"dtype": _DTYPE_NAMES[spec.dtype], "shape": list(spec.shape),
                             "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    header = json.dumps(entries, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header


def _tensor_bytes(tensor: Tensor) -> memoryview:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    if sys.byteorder != "little":  # pragma: no cover - the format is little-endian
        raise ValueError("Expected a little-endian machine to write safetensors, but this one is big-endian.")
    return flat.view(torch.uint8).numpy().data if flat.numel() else memoryview(b"")


class SafetensorsWriter:
    """Write tensors in the order of ``specs`` into ``folder`` as (sharded) safetensors, one tensor at a time.

    Call :meth:`write` once per spec, in order, then :meth:`close` (or use it as a context manager). Each
    tensor is checked against its spec (shape and dtype) before any byte is written.
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        specs: Sequence[TensorSpec],
        *,
        max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.shards = plan_shards(list(specs), max_shard_size)
        self.names = shard_names(len(self.shards))
        self._metadata = {"format": "pt", **(metadata or {})}
        self._queue = [(i, spec) for i, shard in enumerate(self.shards) for spec in shard]
        self._next = 0
        self._file: IO[bytes] | None = None
        self._open_shard = -1

    def write(self, key: str, tensor: Tensor) -> None:
        """Append ``tensor`` as ``key``, which must be the next spec."""
        if self._next >= len(self._queue):
            raise ValueError(f"Expected no more tensors for {str(self.folder)!r}, but got {key!r}.")
        shard, spec = self._queue[self._next]
        _check_against_spec(key, tensor, spec)
        self._file_for(shard).write(_tensor_bytes(tensor))
        self._next += 1

    def _file_for(self, shard: int) -> IO[bytes]:
        if shard != self._open_shard:
            self._close_file()
            self._file = open(self.folder / self.names[shard], "wb")  # noqa: SIM115 - closed in _close_file
            self._file.write(_header(self.shards[shard], self._metadata))
            self._open_shard = shard
        assert self._file is not None
        return self._file

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def close(self) -> list[str]:
        """Finish: check every spec was written, write the index when sharded; returns the files written."""
        self._close_file()
        if self._next != len(self._queue):
            missing = self._queue[self._next][1].key
            raise ValueError(
                f"Expected {len(self._queue)} tensors for {str(self.folder)!r}, but {missing!r} and later"
                f" were never written."
            )
        if len(self.shards) > 1:
            self._write_index()
            return [*self.names, HF_SAFETENSORS_INDEX]
        return list(self.names)

    def _write_index(self) -> None:
        _write_index(self.folder, self.names, self.shards)

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self._close_file()


def _write_index(folder: Path, names: Sequence[str], shards: Sequence[Sequence[TensorSpec]]) -> None:
    weight_map = {spec.key: name for name, shard in zip(names, shards, strict=True) for spec in shard}
    total = sum(spec.nbytes for shard in shards for spec in shard)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / HF_SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")


class ShardLayout:
    """Where every tensor of ``specs`` lies in the output files: the shards of :class:`SafetensorsWriter` (same
    names, headers and order), as a file and a byte offset per key, fixed before any tensor exists.

    :meth:`create` writes each shard's header and sizes the file (the data left as a hole), plus the index when
    sharded; then any process may write any tensor at its place (:func:`write_placed`), in any order. Once every
    tensor is written, the files are byte for byte those :func:`write_stream` writes.
    """

    def __init__(self, specs: Sequence[TensorSpec], *, max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
                 metadata: Mapping[str, str] | None = None) -> None:
        self.shards = plan_shards(list(specs), max_shard_size)
        self.names = shard_names(len(self.shards))
        headers = [_header(shard, {"format": "pt", **(metadata or {})}) for shard in self.shards]
        self._headers = headers
        self.places: dict[str, tuple[str, int, TensorSpec]] = {}
        for name, header, shard in zip(self.names, headers, self.shards, strict=True):
            offset = len(header)
            for spec in shard:
                self.places[spec.key] = (name, offset, spec)
                offset += spec.nbytes

    @property
    def files(self) -> list[str]:
        """The file names the layout writes: the shards, then the index when sharded."""
        return [*self.names, HF_SAFETENSORS_INDEX] if len(self.shards) > 1 else list(self.names)

    def create(self, folder: str | os.PathLike) -> list[str]:
        """Write every shard's header, size each file to its full length, write the index; returns :attr:`files`."""
        folder = Path(folder)
        for name, header, shard in zip(self.names, self._headers, self.shards, strict=True):
            with open(folder / name, "wb") as file:
                file.write(header)
                file.truncate(len(header) + sum(spec.nbytes for spec in shard))
        if len(self.shards) > 1:
            _write_index(folder, self.names, self.shards)
        return self.files


def write_placed(folder: str | os.PathLike, layout: ShardLayout, tensors: Iterable[tuple[str, Tensor]]) -> None:
    """Write ``(key, tensor)`` pairs at their places in the files :meth:`ShardLayout.create` made in ``folder``.

    Each tensor is checked against its spec before any byte is written, and written (``os.pwrite``) in a worker
    thread while the next one is produced, as in :func:`write_stream`. Other processes may write other keys of the
    same files at the same time: the byte ranges are disjoint.
    """
    folder = Path(folder)
    fds: dict[str, int] = {}

    def write(key: str, tensor: Tensor) -> None:
        if key not in layout.places:
            raise ValueError(f"Expected a key of the output layout of {str(folder)!r}, but got {key!r}.")
        name, offset, spec = layout.places[key]
        _check_against_spec(key, tensor, spec)
        if name not in fds:
            fds[name] = os.open(folder / name, os.O_WRONLY)
        data = _tensor_bytes(tensor)
        while data:  # pwrite may write less than asked (e.g. large writes on Linux stop at about 2 GiB)
            written = os.pwrite(fds[name], data, offset)
            data, offset = data[written:], offset + written

    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="lightning-merge-write") as pool:
            pending: Future[None] | None = None
            for key, tensor in tensors:
                if pending is not None:
                    pending.result()
                pending = pool.submit(write, key, tensor)
                del tensor
            if pending is not None:
                pending.result()
    finally:
        for fd in fds.values():
            os.close(fd)


def _check_against_spec(key: str, tensor: Tensor, spec: TensorSpec) -> None:
    if key != spec.key:
        raise ValueError(f"Expected key {spec.key!r} next (keys are written in plan order), but got {key!r}.")
    if not isinstance(tensor, Tensor) or tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
        got = f"{tuple(tensor.shape)} {tensor.dtype}" if isinstance(tensor, Tensor) else type(tensor).__name__
        raise ValueError(
            f"Expected key {key!r} to be a tensor of shape {spec.shape} and dtype {spec.dtype}, but got"
            f" {got}."
        )


def specs_of(state: Mapping[str, Tensor]) -> list[TensorSpec]:
    """The specs of an in-memory state dict, in its order."""
    return [TensorSpec(k, tuple(v.shape), v.dtype) for k, v in state.items()]


def write_stream(
    folder: str | os.PathLike,
    specs: Sequence[TensorSpec],
    tensors: Iterable[tuple[str, Tensor]],
    *,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    metadata: Mapping[str, str] | None = None,
) -> list[str]:
    """Write ``(key, tensor)`` pairs arriving in the order of ``specs``; returns the file names written.

    Each tensor is written in a worker thread while the next one is produced (file writes release the GIL), so
    a merge's output costs no time of its own when the disk keeps up; at most one written tensor is pending.
    An error in ``tensors`` or in a write stops the stream after the write in flight has finished.
    """
    with (
        SafetensorsWriter(folder, specs, max_shard_size=max_shard_size, metadata=metadata) as writer,
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="lightning-merge-write") as pool,
    ):
        pending: Future[None] | None = None
        for key, tensor in tensors:
            if pending is not None:
                pending.result()
            pending = pool.submit(writer.write, key, tensor)
            del tensor
        if pending is not None:
            pending.result()
        return writer.close()


def save_state_dict(
    state: Mapping[str, Tensor],
    folder: str | os.PathLike,
    *,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    metadata: Mapping[str, str] | None = None,
) -> list[str]:
    """Save an in-memory state dict into an existing ``folder`` as (sharded) safetensors; returns the file
    names."""
    if not Path(folder).is_dir():
        raise FileNotFoundError(
            f"Expected argument `folder` to be an existing folder, but got {str(folder)!r}."
        )
    specs = specs_of(state)
    return write_stream(folder, specs, state.items(), max_shard_size=max_shard_size, metadata=metadata)
