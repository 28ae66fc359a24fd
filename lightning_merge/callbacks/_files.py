"""The folders :class:`~lightning_merge.callbacks.MergeCallback` writes: task snapshots and the merged folder.

Every folder is published atomically (:func:`~lightning_merge.io.output.publish_folder`): written into a hidden
temporary sibling and swapped in only once complete, so a crash or a full disk leaves the previous folder (or none).
The merged folder holds the merged weights (excluded keys from the base), each task's excluded keys as
``heads/<task>.safetensors``, and a :class:`~lightning_merge.io.record.MergeRecord` whose inputs carry their files'
sizes and XXH3-128 hashes, in the same schema as the engine's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from lightning_merge.engine import MergePlan
from lightning_merge.io import RECORD_FILE, CheckpointSource, MergeRecord, describe_input, hash_file, publish_folder
from lightning_merge.io.writer import save_state_dict
from lightning_merge.methods import MergeMethod

HEADS = "heads"


def save_snapshot(state: Mapping[str, Tensor], folder: Path) -> None:
    """Publish ``state`` as a folder of safetensors at ``folder`` (replacing it once complete)."""
    with publish_folder(folder) as tmp:
        save_state_dict(state, tmp)


@dataclasses.dataclass(frozen=True)
class MergedRun:
    """What the callback merged, for the record: the method, the plan, the inputs and where it ran."""

    method: MergeMethod
    plan: MergePlan
    base: CheckpointSource
    tasks: Mapping[str, CheckpointSource]
    exclude: tuple[str, ...]
    world_size: int
    device: torch.device
    seconds: float

    def record(self, outputs: list[str]) -> MergeRecord:
        """The merge record, with the inputs' files sized and hashed (XXH3-128) now."""
        sources = [("base", self.base), *(("finetuned", s) for s in self.tasks.values())]
        inputs = [describe_input(role, s.name, len(s.keys()), s.files(), _hashes(s)) for role, s in sources]
        return MergeRecord(
            method=self.method.name,
            options=self.method.options(),
            scaling=float(self.method.scaling),
            inputs=inputs,
            outputs=outputs,
            merged_keys=list(self.plan.merge_keys),
            excluded_keys=list(self.plan.excluded_keys),
            skipped=dict(self.plan.skipped),
            exclude=list(self.exclude),
            device=str(self.device),
            tasks=list(self.tasks),
            world_size=int(self.world_size),
            seconds=round(self.seconds, 3),
        )


def _hashes(source: CheckpointSource) -> dict[Path, str]:
    return {path: hash_file(path, "xxh3_128") for path in source.files()}


def save_merged(folder: Path, state: Mapping[str, Tensor], heads: Mapping[str, Mapping[str, Tensor]],
                run: MergedRun) -> MergeRecord:
    """Publish the merged folder: the weights, ``heads/<task>.safetensors`` and ``merge_record.json``."""
    with publish_folder(folder) as tmp:
        files = save_state_dict(state, tmp)
        for task, head in heads.items():
            (tmp / HEADS).mkdir(exist_ok=True)
            save_file({k: v.contiguous() for k, v in head.items()}, str(tmp / HEADS / f"{task}.safetensors"))
            files.append(f"{HEADS}/{task}.safetensors")
        record = run.record([*files, RECORD_FILE])
        record.save(tmp)
    return record
