"""Publishing an output folder: the one way this library writes a folder the user reads.

Every output (the engine's merged folder, the command's adapters and merged bases, the callback's snapshots and
merged folder, a saved peft adapter, the compressed tasks) is written into a hidden temporary sibling and moved into
place only once it is complete: :func:`publish_folder`. Four guarantees live here, once:

* **Atomic.** An existing folder being replaced is first moved aside, then the new one renamed in, then the old one
  deleted, so that an interruption at any point leaves either the old folder or the new one at the output path.
* **One writer.** A lock is taken before any work, with ``fcntl.flock`` on the hidden file
  ``.<name>.lightning-merge-lock`` beside the output: a second writer to the same output fails at once, naming the
  path and the holder (pid and host). The operating system releases the lock when its process dies, however it dies;
  the lock file is removed when the writer finishes (even on an error), so only a killed process leaves it, empty,
  for the next writer to take and remove. (``flock`` is advisory and, on some network file systems, local to a host.)
* **No debris.** While an output is being written, ``SIGTERM`` (what ``kill`` and ``timeout`` send) is handled like
  Ctrl-C: it raises ``KeyboardInterrupt``, the temporary folder is removed and the previous output kept. This is done
  only in the main thread and only when ``SIGTERM`` has its default handler (a program's own handler is respected);
  the handler is restored afterwards. A ``SIGTERM`` during the final swap or the cleanup is held back until it is
  done, then delivered to the default handler.
  Temporary names carry this library's tag, the writing host's name and the process's id
  (``.<name>.lightning-merge-{tmp,old}-<host>-<pid>-<hex8>``), so the next writer to the same output on the same host
  removes the leftovers of a process that died (a ``SIGKILL``, a power cut): :func:`stale_temporaries`. A live
  process's temporaries and another host's are never touched.
* **Only our own outputs are replaced.** :func:`check_output` (before any work) and :func:`publish_folder` (again,
  under the lock) let ``overwrite`` replace only a previous output of this library (:func:`not_replaceable`: a real
  folder holding a ``merge_record.json`` that :meth:`~lightning_merge.io.record.MergeRecord.load` accepts and that
  lists every file in the folder) or an empty folder, never the working directory or a folder holding it, a plain
  file, a symbolic link, an input, a folder holding an input, or a folder inside an input.

Example:
    >>> import tempfile
    >>> out = Path(tempfile.mkdtemp()) / "merged"
    >>> with publish_folder(out, overwrite=False) as tmp:
    ...     _ = (tmp / "a.txt").write_text("new")
    >>> sorted(p.name for p in out.iterdir()), sorted(p.name for p in out.parent.iterdir())
    (['a.txt'], ['merged'])
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import signal
import socket
import threading
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import FrameType

from lightning_merge.io.record import RECORD_FILE, MergeRecord

__all__ = ["check_output", "not_replaceable", "publish_folder", "stale_temporaries"]

TAG = "lightning-merge"
_FILE_SUFFIXES = (".safetensors", ".ckpt", ".bin", ".pt", ".pth")


def _host() -> str:
    # the host's name, letters and digits only: another host's live process cannot be checked from here, so its
    # temporaries (an output folder on a shared file system) are never taken for stale ones
    return re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32]


def _temporary_name(output: Path, kind: str) -> Path:
    return output.with_name(f".{output.name}.{TAG}-{kind}-{_host()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _lock_name(output: Path) -> Path:
    return output.with_name(f".{output.name}.{TAG}-lock")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # someone else's live process, or we cannot tell: keep its files
    return True


def stale_temporaries(output: str | os.PathLike) -> list[Path]:
    """The temporary siblings of ``output`` left by processes of this library that are no longer running.

    Only names of this module's own pattern (``.<name>.lightning-merge-{tmp,old}-<host>-<pid>-<hex8>``) written on
    this host by a process that is no longer alive are returned; a live writer's temporaries, and other hosts',
    are never listed.
    """
    output = Path(output).absolute()
    pattern = re.compile(rf"\.{re.escape(output.name)}\.{TAG}-(tmp|old)-([A-Za-z0-9]{{0,32}})-(\d+)-[0-9a-f]{{8}}")
    if not output.parent.is_dir():
        return []
    stale = []
    for path in output.parent.iterdir():
        match = pattern.fullmatch(path.name)
        if match and match.group(2) == _host() and not _pid_alive(int(match.group(3))):
            stale.append(path)
    return sorted(stale)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _clean_stale(output: Path) -> None:
    """Remove the stale temporaries of ``output``; a dead writer's old output moved aside is put back first when it
    was killed between moving it aside and moving the new one in (``output`` is missing)."""
    for path in stale_temporaries(output):
        moved_aside = f".{TAG}-old-" in path.name and path.is_dir() and not path.is_symlink()
        if moved_aside and not (output.exists() or output.is_symlink()):
            os.replace(path, output)
        else:
            _remove(path)


# ------------------------------------------------------------------------------------------------ the lock
def _holder(fd: int) -> str:
    with contextlib.suppress(OSError, UnicodeDecodeError):
        text = os.pread(fd, 200, 0).decode().strip()
        if text:
            return f" ({text})"
    return ""


def _acquire(lock: Path, output: Path, argument: str) -> int:
    """Take the lock of ``output``: an exclusive ``flock`` on ``lock``, which must still be the file at that path
    once locked (a finishing writer removes it); returns its descriptor."""
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)  # a planted link is an error, never followed
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise BlockingIOError(
                f"Expected argument `{argument}` to be written by one process at a time, but another one{holder} is"
                f" writing {str(output)!r} now (it holds {str(lock)!r}). HINT: wait for it to finish, or choose"
                " another output path."
            ) from None
        except BaseException:
            os.close(fd)
            raise
        with contextlib.suppress(FileNotFoundError):
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}".encode(), 0)
                return fd
        os.close(fd)  # removed or replaced by the writer that just finished: lock the file now at that path


@contextlib.contextmanager
def _locked(output: Path, argument: str) -> Iterator[None]:
    lock = _lock_name(output)
    fd = _acquire(lock, output, argument)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            lock.unlink()  # while still holding it: a writer waiting on this file sees it gone and retries
        os.close(fd)


# ------------------------------------------------------------------------------------------------ SIGTERM
class _Terminate:
    """The ``SIGTERM`` handler while an output is written: ``KeyboardInterrupt``, held back while ``deferred``."""

    def __init__(self) -> None:
        self.deferred = False
        self.pending = False

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        if self.deferred:
            self.pending = True
            return
        raise KeyboardInterrupt("terminated by SIGTERM")

    @contextlib.contextmanager
    def deferring(self) -> Iterator[None]:
        """Hold ``SIGTERM`` back in this block (the swap, the cleanup); it is sent again once the handler is
        restored, so the process still ends as asked."""
        self.deferred = True
        try:
            yield
        finally:
            self.deferred = False


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[_Terminate]:
    """Handle ``SIGTERM`` like Ctrl-C in this block, when in the main thread and ``SIGTERM`` has its default
    handler; restore the handler afterwards."""
    handler = _Terminate()
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield handler  # not ours to change: a program's own handler, or a thread that cannot set one
        return
    signal.signal(signal.SIGTERM, handler)
    try:
        yield handler
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if handler.pending:
            os.kill(os.getpid(), signal.SIGTERM)  # held back during a swap or a cleanup: now, by the default handler


# ------------------------------------------------------------------------------------------------ publishing
def _swap_in(tmp: Path, output: Path) -> None:
    """Move an existing ``output`` aside, rename ``tmp`` to ``output``, then delete the old one."""
    old = None
    if output.exists() or output.is_symlink():
        old = _temporary_name(output, "old")
        os.replace(output, old)
    try:
        os.replace(tmp, output)
    except BaseException:
        if old is not None:
            os.replace(old, output)  # put the old output back
        raise
    if old is not None:
        _remove(old)


@contextlib.contextmanager
def publish_folder(output: str | os.PathLike, *, overwrite: bool | None = None,
                   argument: str = "output") -> Iterator[Path]:
    """Yield a new hidden temporary folder beside ``output``; publish it as ``output`` when the block completes.

    First the lock of ``output`` is taken (a second writer fails at once) and the stale temporaries of dead processes
    writing to the same output are removed. On success an existing ``output`` is replaced (moved aside first, deleted
    last); on any error or interruption (``KeyboardInterrupt``, and ``SIGTERM`` handled like it) the temporary folder
    is removed and ``output`` is left as it was.

    Args:
        output: the folder to publish.
        overwrite: checked again under the lock, as in :func:`check_output`: ``False``, ``output`` must not exist;
            ``True``, it may exist only as a previous output of this library (:func:`not_replaceable`). ``None``:
            the caller has decided (e.g. the callback's snapshots in its own ``dirpath``).
        argument: the parameter named in errors.

    Raises:
        BlockingIOError: another process is writing ``output``.
        FileExistsError, ValueError: ``output`` may not be replaced (see :func:`check_output`).
    """
    output = Path(output).absolute()
    output.parent.mkdir(parents=True, exist_ok=True)
    with _sigterm_as_interrupt() as handler, _locked(output, argument):
        if overwrite is not None:
            _check_replaceable(output, overwrite, argument)
        _clean_stale(output)
        tmp = _temporary_name(output, "tmp")
        tmp.mkdir()
        try:
            yield tmp
            with handler.deferring():
                _swap_in(tmp, output)
        except BaseException:
            with handler.deferring():
                _remove(tmp)
            raise


# ------------------------------------------------------------------------------------------------ checks
def not_replaceable(folder: str | os.PathLike) -> str | None:
    """Why ``folder`` may not be replaced by an overwrite, or ``None`` when it may: a previous output of this library
    is a folder (not a link, not a mount point) holding a ``merge_record.json`` that
    :meth:`~lightning_merge.io.record.MergeRecord.load` accepts (parsed and schema-checked) and whose ``outputs``
    list every file in the folder, with no link inside it; an empty folder holds nothing to lose and may be replaced
    too. What the user added to an output (notes, plots) makes it theirs: it is never deleted by an overwrite."""
    folder = Path(folder)
    if folder.is_symlink():
        return "is a symbolic link"
    if not folder.is_dir():
        return "is a file"
    if os.path.ismount(folder):
        return "is a mount point"
    if not any(folder.iterdir()):
        return None  # an empty folder: nothing in it to lose
    record = folder / RECORD_FILE
    if record.is_symlink() or not record.is_file():
        return f"holds no {RECORD_FILE}"
    try:
        listed = {*MergeRecord.load(record).outputs, RECORD_FILE}
    except (ValueError, TypeError, OSError) as err:
        return f"holds a {RECORD_FILE} that is not this library's ({' '.join(str(err).split())})"
    for root, dirs, files in os.walk(folder):
        for name in [*dirs, *files]:
            path = Path(root, name)
            relative = path.relative_to(folder).as_posix()
            if path.is_symlink() or (name in files and relative not in listed):
                return f"holds {relative!r}, which its {RECORD_FILE} does not list"
    return None


def _check_replaceable(path: Path, overwrite: bool, argument: str) -> None:
    if not (path.exists() or path.is_symlink()):
        return
    if not overwrite:
        raise FileExistsError(
            f"Expected argument `{argument}` to be a new path, but {str(path)!r} already exists. HINT: pass"
            " overwrite=True (--overwrite) to replace it, or choose another path."
        )
    cwd = Path.cwd().resolve()
    if path.resolve() == cwd or path.resolve() in cwd.parents:
        raise ValueError(
            f"Expected argument `{argument}` to be a previous output of lightning-merge to replace, but {str(path)!r}"
            " is the working directory or holds it; it is never replaced. HINT: choose a new output path."
        )
    reason = not_replaceable(path)
    if reason is not None:
        raise ValueError(
            f"Expected argument `{argument}` to be a previous output of lightning-merge to replace, but {str(path)!r}"
            f" {reason}; overwrite=True replaces only a folder this library wrote. HINT: choose a new output path,"
            " or move that one away yourself."
        )


def check_output(
    output: str | os.PathLike,
    *,
    overwrite: bool,
    inputs: Iterable[str | os.PathLike] = (),
    argument: str = "output",
) -> Path:
    """The absolute output folder path, checked before any work: a folder name (not a weights file name), new
    unless ``overwrite`` (and then only a previous output of this library: :func:`not_replaceable`; never the
    working directory or a folder holding it), and neither an input, nor a folder holding an input, nor inside an
    input folder (links followed). :func:`publish_folder` checks again under the lock.

    Raises:
        TypeError: ``output`` is not a path (``None``, ``""``: an unset shell variable).
        ValueError: a weights file name, a path that holds or lies in an input, or one ``overwrite`` may not replace
            (named in the message).
        FileExistsError: ``output`` exists and ``overwrite`` is False.
    """
    if not isinstance(output, str | os.PathLike) or not isinstance(os.fspath(output), str) or not os.fspath(output):
        raise TypeError(f"Expected argument `{argument}` to be a folder path, but got {output!r}.")
    if "\0" in os.fspath(output):
        raise ValueError(f"Expected argument `{argument}` to be a folder path, but {output!r} holds a NUL character.")
    path = Path(output).absolute()
    if path.suffix in _FILE_SUFFIXES:
        raise ValueError(
            f"Expected argument `{argument}` to be a folder path, but got the file name {str(path)!r}. HINT: the"
            " output is a folder (weights, their shards and merge_record.json); drop the extension."
        )
    _check_outside(path, inputs, argument)
    _check_replaceable(path, bool(overwrite), argument)
    return path


def _check_outside(output: Path, inputs: Iterable[str | os.PathLike], argument: str) -> None:
    resolved = output.resolve()
    for item in inputs:
        source = Path(item).resolve()
        inside_input = source.is_dir() and source in resolved.parents
        if source == resolved or resolved in source.parents or inside_input:
            raise ValueError(
                f"Expected argument `{argument}` to be outside the inputs, but {str(output)!r}"
                f" {'lies inside' if inside_input else 'holds'} the input {str(item)!r}. HINT: inputs are never"
                " modified; choose another output path."
            )
