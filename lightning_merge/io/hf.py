"""The non-weight files of a Hugging Face model folder, copied into an output so that it loads like the base.

``AutoModel.from_pretrained(folder)`` needs ``config.json``; ``AutoTokenizer`` needs the tokenizer files;
sentence-transformers reads its own module files. :func:`copy_model_files` copies exactly the files named in
:data:`MODEL_FILES` (an allow-list: never whatever else the folder holds) and treats the folder as hostile: each file
must be a regular file (no device, FIFO or folder under an allowed name), must not be a symbolic link (except the
Hugging Face cache's own layout, ``snapshots/<revision>/<name> -> ../../blobs/<hash>``, whose links stay inside the
cached repository), must not lie under a linked folder, and must be at most ``max_bytes`` (64 MiB by default): a
larger one is an error naming the file, never a silent skip. Each is written with its own name into the output,
which must not have it yet. Never imports Lightning or transformers.

Example:
    >>> import tempfile
    >>> base, out = Path(tempfile.mkdtemp()), Path(tempfile.mkdtemp())
    >>> _ = (base / "config.json").write_text('{"model_type": "bert"}')
    >>> _ = (base / "vocab.txt").write_text("[PAD]")
    >>> _ = (base / "model.safetensors").write_bytes(b"weights are never copied")
    >>> _ = (base / "notes.txt").write_text("neither is anything not allow-listed")
    >>> copy_model_files(base, out), sorted(p.name for p in out.iterdir())
    (['config.json', 'vocab.txt'], ['config.json', 'vocab.txt'])
"""

from __future__ import annotations

import os
import stat
from pathlib import Path, PurePosixPath

from lightning_merge.io.protocol import CheckpointSource

__all__ = ["MAX_FILE_BYTES", "MODEL_FILES", "copy_model_files", "folder_member", "model_folder"]

MODEL_FILES: tuple[str, ...] = (
    # the model's configuration (from_pretrained)
    "config.json",
    "generation_config.json",
    # tokenizers (AutoTokenizer): fast, WordPiece, BPE, SentencePiece
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "tokenizer.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
    # processors (AutoProcessor, AutoImageProcessor)
    "preprocessor_config.json",
    "processor_config.json",
    # sentence-transformers (SentenceTransformer(folder)): module list, its options, the pooling module
    "modules.json",
    "config_sentence_transformers.json",
    "sentence_bert_config.json",
    "1_Pooling/config.json",
)
"""Every file :func:`copy_model_files` may copy, relative to the model folder."""

MAX_FILE_BYTES = 64 * 2**20
"""The default size limit of one copied file (the largest tokenizers of public models are about 35 MiB)."""

_READ_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
_CHUNK = 2**20


def model_folder(source: CheckpointSource) -> Path | None:
    """The Hugging Face model folder ``source`` was opened from (its ``root()``, when that is a folder with a
    ``config.json``), or ``None``.

    Example:
        >>> from lightning_merge.io.sources import open_source
        >>> import torch
        >>> model_folder(open_source({"w": torch.zeros(1)})) is None
        True
    """
    root = source.root()
    if root is None or not Path(root).is_dir() or not os.path.lexists(Path(root) / "config.json"):
        return None
    return Path(root)


def folder_member(folder: str | os.PathLike, name: object, where: str) -> Path:
    """``folder/name``, checked to stay inside ``folder``: the weights files a model folder or its shard index names.

    ``name`` must be a relative path without ``..`` (an index naming ``/abs/path`` or ``../x`` would make the merge
    read a file from elsewhere into its output), and the file it reaches, links followed, must lie inside the
    folder, or be the Hugging Face cache's blob of the same repository (``snapshots/<revision>/<name> ->
    ../../blobs/<hash>``, the cache's own layout). ``where`` names the origin of ``name`` in messages.

    Raises:
        ValueError: a name that is not a relative path inside the folder, or a link that leaves it.

    Example:
        >>> folder_member("model", "model-00001-of-00002.safetensors", "the index").as_posix()
        'model/model-00001-of-00002.safetensors'
        >>> folder_member("model", "../secret.safetensors", "the index")
        Traceback (most recent call last):
        ...
        ValueError: Expected the index to name a file inside the model folder 'model', but got '../secret.safetensors'.
    """
    folder = Path(folder)
    pure = PurePosixPath(name) if isinstance(name, str) else None
    if pure is None or not name or "\x00" in str(name) or pure.is_absolute() or ".." in pure.parts:
        raise ValueError(f"Expected {where} to name a file inside the model folder {str(folder)!r}, but got {name!r}.")
    path = folder / str(name)
    target, inside = path.resolve(), folder.resolve()
    blobs = (folder.parent.parent / "blobs").resolve()
    if target.is_relative_to(inside) or (folder.parent.name == "snapshots" and target.parent == blobs):
        return path
    raise ValueError(
        f"Expected {str(name)!r} ({where}) to be a file inside the model folder {str(folder)!r}, but it links to"
        f" {str(target)!r} outside it. HINT: pass the file itself, or copy it into the folder."
    )


def copy_model_files(
    source_folder: str | os.PathLike, dest_folder: str | os.PathLike, *, max_bytes: int = MAX_FILE_BYTES
) -> list[str]:
    """Copy the files of :data:`MODEL_FILES` that ``source_folder`` has into ``dest_folder``; returns their names.

    Args:
        source_folder: a Hugging Face model folder (only read).
        dest_folder: an existing folder without any of those files (e.g. the output's temporary folder).
        max_bytes: the size limit of one file.

    Returns:
        The names copied (relative paths such as ``"1_Pooling/config.json"``), in :data:`MODEL_FILES` order.

    Raises:
        NotADirectoryError: either folder is not a folder.
        ValueError: a bad ``max_bytes``; an allowed name that is a link out of the folder, lies under a linked
            folder, is not a regular file, or is larger than ``max_bytes`` (each naming the file).
        FileExistsError: ``dest_folder`` already holds one of the files.
    """
    if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 0:
        raise ValueError(f"Expected argument `max_bytes` to be a non-negative int, but got {max_bytes!r}.")
    source, dest = Path(source_folder), Path(dest_folder)
    for argument, folder in (("source_folder", source), ("dest_folder", dest)):
        if not folder.is_dir():
            raise NotADirectoryError(f"Expected argument `{argument}` to be a folder, but got {str(folder)!r}.")
    copied = []
    for name in MODEL_FILES:
        member = _member(source, name)
        if member is not None:
            _copy_bounded(member, source, name, dest / name, max_bytes)
            copied.append(name)
    return copied


def _member(folder: Path, name: str) -> Path | None:
    """The path to read for ``folder/name``: itself, its Hugging Face cache blob, or ``None`` when absent."""
    path = folder
    for part in name.split("/")[:-1]:
        path = path / part
        if not os.path.lexists(path):
            return None
        if path.is_symlink() or not path.is_dir():
            raise ValueError(
                f"Expected {part!r} in model folder {str(folder)!r} to be a folder inside it (it holds {name!r}),"
                " but it is a link or not a folder."
            )
    path = folder / name
    if not os.path.lexists(path):
        return None
    return _cache_blob(folder, name) if path.is_symlink() else path


def _cache_blob(folder: Path, name: str) -> Path:
    """The blob that the Hugging Face cache's ``snapshots/<revision>/<name>`` links to, refusing any other link."""
    blobs = (folder.parent.parent / "blobs").resolve()
    target = (folder / name).resolve()
    if folder.parent.name == "snapshots" and target.parent == blobs:
        return target
    raise ValueError(
        f"Expected {name!r} in model folder {str(folder)!r} to be a regular file, but it is a link to"
        f" {str(target)!r}. HINT: links are followed only into the Hugging Face cache's blobs/ of the same repository;"
        " copy the file into the folder."
    )


def _copy_bounded(member: Path, folder: Path, name: str, dest: Path, max_bytes: int) -> None:
    """Copy the regular file ``member`` (opened without following a link) to the new file ``dest``, at most
    ``max_bytes``."""
    fd = os.open(member, _READ_FLAGS)  # no link followed: a file swapped for a link meanwhile fails here
    try:
        info = os.fstat(fd)  # of what was opened, not of the name: no race between the check and the read
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(
                f"Expected {name!r} in model folder {str(folder)!r} to be a regular file, but it is not"
                f" (mode {stat.filemode(info.st_mode)})."
            )
        _check_size(info.st_size, max_bytes, folder, name)
        src = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with src:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with open(dest, "xb") as out:
            written = 0
            while chunk := src.read(_CHUNK):
                written += len(chunk)
                _check_size(written, max_bytes, folder, name)  # a file that grows while it is read
                out.write(chunk)


def _check_size(size: int, max_bytes: int, folder: Path, name: str) -> None:
    if size > max_bytes:
        raise ValueError(
            f"Expected {name!r} in model folder {str(folder)!r} to be at most {max_bytes} bytes"
            f" ({max_bytes / 2**20:.0f} MiB), but it has {size} bytes. HINT: a model folder's configuration and"
            " tokenizer files are small; check that this file is what its name says."
        )
