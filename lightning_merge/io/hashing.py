"""Input hashes for the merge record: whole files, or files hashed while a merge reads them.

:func:`hash_file` hashes one file. For a merge, :func:`start_hashing` hashes every input file in a worker thread at
the lowest CPU priority; for files in which the sources locate keys (``CheckpointSource.location``) it trails the
merge's reads (:class:`ReadMarks`), so that it hashes pages the merge has just brought into the page cache instead of
reading inputs a second time. Never imports Lightning.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import threading
from collections.abc import Collection, Sequence
from concurrent.futures import Executor, Future
from pathlib import Path

import xxhash

from lightning_merge.functional._checks import check_choice, check_positive_int
from lightning_merge.io.sources import CheckpointSource

__all__ = ["HASHES", "ReadMarks", "hash_file", "start_hashing"]

HASHES = ("xxh3_128", "sha256")


def hash_file(path: str | os.PathLike, algorithm: str = "xxh3_128", chunk_size: int = 2**17) -> str:
    """``"<algorithm>:<hex digest>"`` of a file's bytes, read ``chunk_size`` bytes at a time into one reused
    buffer (128 KiB by default: it stays in cache while hashed; reads of 256 KiB or more were up to 7x slower
    from the page cache here).

    ``algorithm``: ``"xxh3_128"`` (XXH3, 128 bits: about 12 GB/s on one core, which keeps up with reading the
    file) or ``"sha256"`` (cryptographic, and the id the Hugging Face Hub shows for LFS files, but about
    1.5 GB/s with SHA extensions: about 10x the time of reading the file from the page cache).

    Example:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "empty.bin"
        >>> _ = path.write_bytes(b"")
        >>> hash_file(path, "sha256")
        'sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855'
    """
    check_choice("algorithm", algorithm, HASHES)
    check_positive_int("chunk_size", chunk_size, unit="bytes")
    with _FileHash(Path(path), algorithm) as state:
        state.update_to(state.size, memoryview(bytearray(chunk_size)))
        return state.hexdigest()


class _FileHash:
    """The running hash of one file, read front to back."""

    def __init__(self, path: Path, algorithm: str) -> None:
        self.path, self.algorithm = path, algorithm
        self._file = open(path, "rb", buffering=0)  # noqa: SIM115 - closed by close()
        self.size = os.fstat(self._file.fileno()).st_size
        self.done = 0
        self._digest = hashlib.sha256() if algorithm == "sha256" else xxhash.xxh3_128()

    def update_to(self, end: int, buffer: memoryview) -> None:
        """Hash the file's bytes up to offset ``end``."""
        while self.done < end:
            n = self._file.readinto(buffer[: min(len(buffer), end - self.done)])
            if not n:
                raise OSError(
                    f"Input file {str(self.path)!r} shrank while it was hashed (was {self.size} bytes, ends"
                    f" at {self.done}): was it modified during the merge?"
                )
            self._digest.update(buffer[:n])
            self.done += n

    def hexdigest(self) -> str:
        return f"{self.algorithm}:{self._digest.hexdigest()}"

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> _FileHash:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ReadMarks:
    """How far the merge has read into each input file, so that the hash thread can trail it.

    The merge reports, after each key, the end offset of that key's bytes in every file it read; the hash
    thread hashes each file front to back, but only up to that mark, so that it reads what the merge has just
    read while it is still in the page cache instead of reading every input a second time from disk (inputs
    larger than memory), or competing with the merge for the disk. :meth:`close` lifts the marks (the rest of
    each file is then hashed at once); ``close(abort=True)`` stops the hashing.
    """

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._marks: dict[Path, int] = {}
        self._version = 0
        self.closed = self.aborted = False

    def advance(self, path: Path, end: int) -> None:
        with self._changed:
            if end > self._marks.get(path, 0):
                self._marks[path] = end
                self._version += 1
                self._changed.notify_all()

    def close(self, abort: bool = False) -> None:
        with self._changed:
            self.closed, self.aborted = True, self.aborted or abort
            self._version += 1
            self._changed.notify_all()

    def limits(self, files: Sequence[_FileHash]) -> tuple[list[int], int]:
        """Each file's hashable end now, and the version they were read at (for :meth:`wait`)."""
        with self._changed:
            ends = [f.size if self.closed else min(f.size, self._marks.get(f.path, 0)) for f in files]
            return ends, self._version

    def wait(self, version: int) -> None:
        """Return once a mark moved (or the marks were closed) since ``version``."""
        with self._changed:
            self._changed.wait_for(lambda: self._version != version)


def _hash_trailing(paths: Sequence[Path], algorithm: str, marks: ReadMarks, followed: Collection[Path],
                   step: int = 2**24) -> dict[Path, str]:
    """The hashes of ``paths``: the ``followed`` files (those whose reads the merge reports) up to the merge's
    marks, the others at once; a turn hashes at most ``step`` bytes of each file, round robin.

    **(choice)** While the merge runs, the hashing is done by a helper thread at the lowest CPU priority (it takes
    the cycles the merge leaves idle); once the merge closes the marks it is waiting for the hashes, so the helper
    stops at its next step and this thread, at the caller's priority, hashes the rest. Before, the lowest-priority
    thread finished the job alone: next to a CPU-bound process it got about 1% of a core, and a 4.7 s merge waited
    120 s for its record (issue 16).
    """
    states = [_FileHash(p, algorithm) for p in paths]
    try:
        helper = threading.Thread(target=_trail, args=(states, marks, followed, step),
                                  name=f"{threading.current_thread().name}-low", daemon=True)
        helper.start()
        helper.join()
        if marks.aborted:
            raise RuntimeError("hashing stopped: the merge failed")
        buffer = memoryview(bytearray(2**17))
        for state in states:
            state.update_to(state.size, buffer)
        return {f.path: f.hexdigest() for f in states}
    finally:
        for state in states:
            state.close()


def _trail(states: Sequence[_FileHash], marks: ReadMarks, followed: Collection[Path], step: int) -> None:
    # The low-priority part of _hash_trailing: up to the marks, until every file is hashed or the marks close.
    _lower_priority()
    buffer = memoryview(bytearray(2**17))
    pending = list(states)
    while pending and not marks.closed:
        ends, version = marks.limits(pending)
        moved = False
        for state, end in zip(pending, ends, strict=True):
            end = end if state.path in followed else state.size
            if state.done < end and not marks.closed:
                state.update_to(min(end, state.done + step), buffer)
                moved = True
        pending = [f for f in pending if f.done < f.size]
        if pending and not moved:
            marks.wait(version)


def start_hashing(
    sources: Sequence[CheckpointSource],
    algorithm: str | None,
    pool: Executor,
    marks: ReadMarks,
    only: Collection[Path] | None = None,
) -> Future[dict[Path, str]] | None:
    """The hash of every input file, computed in a worker thread while the merge runs (both hashes release
    the GIL), trailing the merge's reads of safetensors files (see :class:`ReadMarks`). On Linux the worker
    runs at the lowest CPU priority, so that it takes the cycles the merge leaves idle (its single-threaded
    eigendecompositions, I/O waits) rather than slowing it down; what is left when the merge closes ``marks`` is
    hashed at the caller's priority (:func:`_hash_trailing`), so a busy CPU does not stall the record. ``only``:
    hash just these of the sources' files (one rank's share in a merge of many processes)."""
    if algorithm is None:
        return None
    files = [p for p in dict.fromkeys(p for source in sources for p in source.files()) if only is None or p in only]
    return pool.submit(_hash_trailing, files, algorithm, marks, _located_files(sources))


def _located_files(sources: Sequence[CheckpointSource]) -> set[Path]:
    """The files whose reads the merge reports to :class:`ReadMarks`: where a source locates some key."""
    return {where[0] for source in sources for key in source.keys()
            if (where := source.location(key)) is not None}


def _lower_priority() -> None:
    # Linux threads are scheduled like processes: PRIO_PROCESS with the thread's id renices this thread only.
    if sys.platform == "linux":
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
