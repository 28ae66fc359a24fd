"""The folders :class:`~lightning_merge.callbacks.MergeCallback` writes: task snapshots and the merged folder.

Every folder is published atomically (:func:`~lightning_merge.io.output.publish_folder`): written into a hidden
temporary sibling and swapped in only once complete, so a crash or a full disk leaves the previous folder (or none).
The merged folder holds the merged weights (excluded keys from the base; or, when the module holds a
``transformers`` model, a Hugging Face model folder: :mod:`~lightning_merge.callbacks._hf`), each task's excluded keys
as ``heads/<task>.safetensors`` (keyed as in the LightningModule; the file name is the task's safe name), and a
:class:`~lightning_merge.io.record.MergeRecord` whose inputs carry their files' sizes and XXH3-128 hashes, in the
same schema as the engine's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from safetensors.torch import save_file
from torch import Tensor

from lightning_merge.callbacks._hf import save_hf_model
from lightning_merge.callbacks._tasks import safe_name
from lightning_merge.engine import MergePlan, merge_record
from lightning_merge.io import RECORD_FILE, CheckpointSource, MergeRecord, hash_file, publish_folder
from lightning_merge.io.writer import DEFAULT_MAX_SHARD_SIZE, save_state_dict
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
        hashes = {path: hash_file(path, "xxh3_128") for _, s in sources for path in s.files()}
        return merge_record(
            self.method, self.plan, sources, hashes, outputs,
            exclude=list(self.exclude),
            device=str(self.device),
            tasks=list(self.tasks),
            world_size=int(self.world_size),
            seconds=round(self.seconds, 3),
        )


def save_heads(folder: Path, heads: Mapping[str, Mapping[str, Tensor]]) -> list[str]:
    """Write each task's task-specific tensors as ``folder/<task>.safetensors`` (the task's safe file name)."""
    if heads:
        folder.mkdir(parents=True, exist_ok=True)
    for task, head in heads.items():
        save_file({k: v.contiguous() for k, v in head.items()}, str(folder / f"{safe_name(task)}.safetensors"))
    return [f"{safe_name(task)}.safetensors" for task in heads]


def save_merged(folder: Path, state: Mapping[str, Tensor], heads: Mapping[str, Mapping[str, Tensor]],
                run: MergedRun, *, max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
                hf_model: tuple[str, Any] | None = None) -> MergeRecord:
    """Publish the merged folder: the weights (a Hugging Face model folder when ``hf_model`` is the module's
    ``(attribute path, PreTrainedModel)``), ``heads/<task>.safetensors`` and ``merge_record.json``; an existing
    ``folder`` is replaced only when it is a previous output (its record lists every file in it)."""
    with publish_folder(folder, overwrite=True, argument="dirpath") as tmp:
        if hf_model is not None:
            files = save_hf_model(tmp, hf_model, state, run.plan.excluded_keys, max_shard_size)
        else:
            files = save_state_dict(state, tmp, max_shard_size=max_shard_size)
        files += [f"{HEADS}/{name}" for name in save_heads(tmp / HEADS, heads)]
        record = run.record([*files, RECORD_FILE])
        record.save(tmp)
    return record


def log_merge(method: MergeMethod, seconds: float | None, num_tasks: int, world_size: int, loggers: Sequence[Any],
              step: int) -> None:
    """Log the merge on rank zero, and its method, options and time to the trainer's loggers."""
    rank_zero_info(
        f"MergeCallback: merged {num_tasks} tasks with {method.name} {method.options()} in {seconds or 0.0:.2f} s on"
        f" {world_size} rank(s)."
    )
    params = {f"merge/{k}": v for k, v in method.options().items()}
    for logger in loggers:
        logger.log_hyperparams({"merge/method": method.name, **params})
        logger.log_metrics({"merge/seconds": float(seconds or 0.0), "merge/num_tasks": num_tasks}, step=step)
