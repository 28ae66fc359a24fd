"""Publishing an output folder: the one way this library writes a folder the user reads.

Every output (the engine's merged folder, the command's adapters and merged bases, the callback's snapshots and
merged folder, a saved peft adapter) is written into a hidden temporary sibling and moved into place only once it
is complete: :func:`publish_folder`. An existing folder being replaced is first moved aside, then the new one renamed
in, then the old one deleted, so that an interruption at any point leaves either the old folder or the new one at
the output path (and at worst a hidden sibling), never neither. Temporary names carry this library's tag, the
writing host's name and the process's id (``.<name>.lightning-merge-tmp-<host>-<pid>-<hex>``), so a later run on the
same host to the same output recognises the leftovers of a process that died (:func:`stale_temporaries`) and removes
them. :func:`check_output` holds the checks made before any work: a folder path, new unless ``overwrite``, and
outside every input.

Example:
    >>> import tempfile
    >>> out = Path(tempfile.mkdtemp()) / "merged"
    >>> with publish_folder(out) as tmp:
    ...     _ = (tmp / "a.txt").write_text("new")
    >>> sorted(p.name for p in out.iterdir()), sorted(p.name for p in out.parent.iterdir())
    (['a.txt'], ['merged'])
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

__all__ = ["check_output", "publish_folder", "stale_temporaries"]

TAG = "lightning-merge"
_FILE_SUFFIXES = (".safetensors", ".ckpt", ".bin", ".pt", ".pth")


def _host() -> str:
    # the host's name, letters and digits only: another host's live process cannot be checked from here, so its
    # temporaries (an output folder on a shared file system) are never taken for stale ones
    return re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32]


def _temporary_name(output: Path, kind: str) -> Path:
    return output.with_name(f".{output.name}.{TAG}-{kind}-{_host()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


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
def publish_folder(output: str | os.PathLike) -> Iterator[Path]:
    """Yield a new hidden temporary folder beside ``output``; publish it as ``output`` when the block completes.

    On success an existing ``output`` is replaced (moved aside first, deleted last); on any error or interruption
    (``KeyboardInterrupt`` included) the temporary folder is removed and ``output`` is left as it was. Stale
    temporaries of dead processes writing to the same output are removed first. Whether ``output`` may be replaced
    is the caller's decision (see :func:`check_output`).
    """
    output = Path(output).absolute()
    output.parent.mkdir(parents=True, exist_ok=True)
    for path in stale_temporaries(output):
        _remove(path)
    tmp = _temporary_name(output, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        _swap_in(tmp, output)
    except BaseException:
        _remove(tmp)
        raise


def check_output(
    output: str | os.PathLike,
    *,
    overwrite: bool,
    inputs: Iterable[str | os.PathLike] = (),
    argument: str = "output",
) -> Path:
    """The absolute output folder path, checked before any work: a folder name (not a weights file name), new
    unless ``overwrite``, and neither an input, nor a folder holding an input, nor inside an input folder.

    Raises:
        TypeError: ``output`` is not a path.
        ValueError: a weights file name, or a path that holds or lies in an input (named in the message).
        FileExistsError: ``output`` exists and ``overwrite`` is False.
    """
    if not isinstance(output, str | os.PathLike) or not os.fspath(output):
        raise TypeError(f"Expected argument `{argument}` to be a folder path, but got {output!r}.")
    path = Path(output).absolute()
    if path.suffix in _FILE_SUFFIXES:
        raise ValueError(
            f"Expected argument `{argument}` to be a folder path, but got the file name {str(path)!r}. HINT: the"
            " output is a folder (weights, their shards and merge_record.json); drop the extension."
        )
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise FileExistsError(
            f"Expected argument `{argument}` to be a new path, but {str(path)!r} already exists. HINT: pass"
            " overwrite=True (--overwrite) to replace it, or choose another path."
        )
    _check_outside(path, inputs, argument)
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
