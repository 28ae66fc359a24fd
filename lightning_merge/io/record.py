"""The merge record: one schema for ``merge_record.json``, written by every path that produces a merged output.

The engine (``merge_checkpoints``), the callback's merged folder and the command's merge of adapters into a base all
write a :class:`MergeRecord`: the method and its options, every input with its files' sizes and hashes, the files
written, and the keys merged, excluded (task-specific) and skipped (copied from the base, with the reason).
``schema_version`` changes when a field changes meaning; :meth:`MergeRecord.load` reads any version up to this one
and checks the fields' types: a record that loads is also what marks a folder as an output of this library, which
``overwrite`` may replace (:func:`~lightning_merge.io.output.not_replaceable`).

Example:
    >>> import tempfile
    >>> record = MergeRecord(method="average", options={"scaling": 1.0}, scaling=1.0, inputs=[],
    ...                      outputs=["model.safetensors"], merged_keys=["w"])
    >>> folder = tempfile.mkdtemp()
    >>> MergeRecord.load(record.save(folder).parent) == record
    True
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["RECORD_FILE", "SCHEMA_VERSION", "MergeRecord", "describe_input"]

RECORD_FILE = "merge_record.json"
SCHEMA_VERSION = 1


def _version() -> str:
    import lightning_merge  # at call time: the package's __init__ imports the modules that import this one

    return str(getattr(lightning_merge, "__version__", "unknown"))


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def describe_input(role: str, name: str, num_keys: int, files: Iterable[Path],
                   hashes: Mapping[Path, str] | None = None) -> dict[str, Any]:
    """One entry of :attr:`MergeRecord.inputs`: the role (``"base"``, ``"finetuned"``, ``"adapter"``), the source's
    name, its number of keys and its files, each with its size in bytes and hash (``"<algorithm>:<hex>"``, or
    ``None`` when not hashed)."""
    hashes = hashes or {}
    entries = [{"path": str(p), "bytes": p.stat().st_size, "hash": hashes.get(p)} for p in files]
    return {"role": role, "name": name, "keys": int(num_keys), "files": entries}


@dataclasses.dataclass(frozen=True)
class MergeRecord:
    """What a merge did; saved as ``merge_record.json`` beside the merged weights.

    Attributes:
        method: the registry name. options: its constructor arguments. scaling: the coefficient ``lam``.
        inputs: per input, its role, name, number of keys and files with sizes and hashes (:func:`describe_input`).
        outputs: the files written in the output folder (relative paths).
        merged_keys: the keys merged. excluded_keys: task-specific keys (``exclude``), never merged.
        skipped: key -> reason for keys not merged (copied from the base, or left out).
        exclude, strict: the planning options. device, dtype: where and in which output dtype the merge ran.
        tasks: the task names, when the inputs are named tasks (the callback). world_size: the ranks that merged.
        version: ``lightning_merge.__version__``. created: local time. seconds: the merge's wall time.
        schema_version: the version of this schema.
    """

    method: str
    options: dict[str, Any]
    scaling: float
    inputs: list[dict[str, Any]]
    outputs: list[str]
    merged_keys: list[str]
    excluded_keys: list[str] = dataclasses.field(default_factory=list)
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)
    exclude: list[str] = dataclasses.field(default_factory=list)
    strict: bool = True
    device: str = "cpu"
    dtype: str | None = None
    tasks: list[str] = dataclasses.field(default_factory=list)
    world_size: int = 1
    version: str = dataclasses.field(default_factory=_version)
    created: str = dataclasses.field(default_factory=_now)
    seconds: float = 0.0
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        """The record as JSON-serializable primitives."""
        return dataclasses.asdict(self)

    def save(self, folder: str | os.PathLike) -> Path:
        """Write ``merge_record.json`` into ``folder``; returns its path."""
        path = Path(folder) / RECORD_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2, default=str) + "\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> MergeRecord:
        """Read a record from ``merge_record.json`` or from the folder that holds it.

        Raises:
            FileNotFoundError: no record there.
            ValueError: not a JSON object of this schema (missing fields, fields of the wrong type, a newer
                ``schema_version``), naming the file.
        """
        path = Path(path)
        path = path / RECORD_FILE if path.is_dir() else path
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(
                f"Expected {str(path)!r} to hold a JSON merge record, but it does not parse ({err})."
            ) from None
        return cls._from_dict(data, path)

    @classmethod
    def _from_dict(cls, data: Any, path: Path) -> MergeRecord:
        if not isinstance(data, dict):
            raise ValueError(f"Expected {str(path)!r} to hold a JSON object, but got {type(data).__name__}.")
        version = data.get("schema_version", SCHEMA_VERSION)
        if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= SCHEMA_VERSION:
            raise ValueError(
                f"Expected `schema_version` in {str(path)!r} to be an int in [1, {SCHEMA_VERSION}], but got"
                f" {version!r}. HINT: a newer lightning-merge wrote it; upgrade to read it."
            )
        fields = {f.name: f for f in dataclasses.fields(cls)}
        required = [n for n, f in fields.items() if f.default is dataclasses.MISSING
                    and f.default_factory is dataclasses.MISSING]
        missing = [n for n in required if n not in data]
        if missing:
            raise ValueError(f"Expected {str(path)!r} to hold the merge record fields {missing}, but they are missing.")
        for name, (check, what) in _FIELD_TYPES.items():
            if name in data and not check(data[name]):
                raise ValueError(f"Expected `{name}` in {str(path)!r} to be {what}, but got {data[name]!r:.80}.")
        return cls(**{k: v for k, v in data.items() if k in fields})


def _names(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# the fields' types, checked when a record is read back: a record also marks a folder as this library's output
_FIELD_TYPES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "method": (lambda v: isinstance(v, str), "a string"),
    "options": (lambda v: isinstance(v, dict), "a JSON object"),
    "scaling": (_number, "a number"),
    "inputs": (lambda v: isinstance(v, list) and all(isinstance(e, dict) for e in v), "a list of JSON objects"),
    "outputs": (_names, "a list of file names"),
    "merged_keys": (_names, "a list of keys"),
    "excluded_keys": (_names, "a list of keys"),
    "skipped": (lambda v: isinstance(v, dict), "a JSON object"),
    "exclude": (_names, "a list of patterns"),
    "strict": (lambda v: isinstance(v, bool), "true or false"),
    "tasks": (_names, "a list of task names"),
    "world_size": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an int"),
}
