"""Helpers of the robustness tests (issue #8): pickle payloads, a full disk, and the fault-injecting pieces that
ddp_spawn must pickle (so they live at module level). Run as a script, it is the child process of the
distributed-fault tests (see :func:`main`).
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import os
import pathlib
import signal
import sys
import time
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from safetensors.torch import save_file

from lightning_merge.callbacks import MergeCallback
from lightning_merge.methods import TSVM
from tests._callback_helpers import TASKS, pretrained_state, task_loader, task_module, trainer

EXCLUDE = ["head.*"]
WAIT_S = 20.0  # how long rank 1 waits for rank 0's error record before giving up (bounds the test)


# ---------------------------------------------------------------------------------------------- files
def sha256_tree(folder: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``folder`` (to prove inputs are left unchanged)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


class TouchPayload:
    """Unpickling this object creates ``marker`` (``Path.touch``): what a malicious checkpoint would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = Path(marker)

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


class ShellPayload(TouchPayload):
    """Unpickling this object runs a shell command (``os.system``) that creates ``marker``."""

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


class FullDisk:
    """A stand-in for ``open`` in the writer module: the disk fills after ``budget`` bytes in all, then every
    write fails with ``ENOSPC`` (after writing what still fits, as a real full disk does)."""

    def __init__(self, budget: int) -> None:
        self.budget, self.written, self.failures = budget, 0, 0

    def __call__(self, path, mode="r", *args, **kwargs):
        return _FillingFile(open(path, mode, *args, **kwargs), self, str(path))  # noqa: SIM115


class _FillingFile:
    def __init__(self, file, disk: FullDisk, path: str) -> None:
        self._file, self._disk, self._path = file, disk, path

    def write(self, data) -> int:
        data = memoryview(data).cast("B")
        room = self._disk.budget - self._disk.written
        if len(data) > room:
            self._file.write(data[:max(room, 0)])
            self._disk.written, self._disk.failures = self._disk.budget, self._disk.failures + 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self._path)
        self._disk.written += len(data)
        return self._file.write(data)

    def close(self) -> None:
        self._file.close()

    def __getattr__(self, name):
        return getattr(self._file, name)


# -------------------------------------------------------------------------------- distributed faults
@dataclasses.dataclass(frozen=True)
class FailOnRank1(TSVM):
    """TSV-M that fails on global rank 1, as an out-of-memory or a corrupt tensor would on one GPU."""

    def merge(self, task_vectors):
        if torch.distributed.is_initialized() and torch.distributed.get_rank() == 1:
            raise RuntimeError("simulated merge failure on rank 1")
        return super().merge(task_vectors)


class RecordingMergeCallback(MergeCallback):
    """A MergeCallback whose ``merge`` writes the error that ended it on each rank, and when, to
    ``<records>/rank<r>.error``, then waits (at most ``WAIT_S``) for every other rank's record before raising:
    ddp_spawn's parent terminates the other ranks as soon as one has failed, which would otherwise hide whether
    they stopped by themselves. (``on_exception`` hooks run in the parent under ddp_spawn, not in the ranks.)"""

    def __init__(self, records: Path, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.records = Path(records)

    def merge(self, trainer, pl_module):
        try:
            super().merge(trainer, pl_module)
        except Exception as err:
            text = f"{time.time()}\n{type(err).__name__}: {err}"
            (self.records / f"rank{trainer.global_rank}.error").write_text(text)
            deadline = time.monotonic() + WAIT_S
            while len(list(self.records.glob("rank*.error"))) < trainer.world_size and time.monotonic() < deadline:
                time.sleep(0.1)
            raise


def write_task_checkpoints(folder: Path) -> dict[str, Path]:
    """A base and two fine-tuned safetensors files (workflow 2 inputs), slightly perturbed from the base."""
    base = pretrained_state()
    save_file(base, str(folder / "base.safetensors"))
    paths = {}
    for i, task in enumerate(TASKS[:2]):
        g = torch.Generator().manual_seed(i)
        save_file({k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()},
                  str(folder / f"{task}.safetensors"))
        paths[task] = folder / f"{task}.safetensors"
    return paths


def fail_on_rank_1(folder: Path) -> None:
    """Workflow 2 under ddp_spawn on 2 CPU processes, with rank 1 failing inside the merge."""
    merge = RecordingMergeCallback(folder, FailOnRank1(rank=2), base=folder / "base.safetensors",
                                   finetuned=write_task_checkpoints(folder), exclude=EXCLUDE, dirpath=folder / "m",
                                   progress=False)
    trainer(folder, [merge], max_epochs=1, limit_train_batches=1, devices=2,
            strategy="ddp_spawn").fit(task_module(pretrained_state()), task_loader(0))


class KillAtEpoch(Callback):
    """SIGKILL this process when ``epoch`` starts (after the checkpoint of the epoch before): no cleanup runs."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            os.kill(os.getpid(), signal.SIGKILL)


def merge_callback(folder: Path) -> MergeCallback:
    return MergeCallback("tsv_m", tasks=TASKS, exclude=EXCLUDE, dirpath=folder / "m", progress=False)


def killed_mid_task(folder: Path) -> None:
    """Workflow 1: task 0 completes, task 1 is killed at the start of its third epoch."""
    merge, base = merge_callback(folder), pretrained_state()
    trainer(folder, [merge], max_epochs=3).fit(task_module(base), task_loader(0))
    ckpt = ModelCheckpoint(dirpath=folder / "ckpt", save_last=True)
    trainer(folder, [merge, ckpt, KillAtEpoch(2)], max_epochs=3, enable_checkpointing=True).fit(
        task_module(base), task_loader(1))


def main() -> None:
    """Run ``fail-on-rank-1`` or ``killed-mid-task`` in ``sys.argv[2]`` (imported by ``python -c``, so that the
    classes above are pickled under this module's name, not ``__main__``)."""
    {"fail-on-rank-1": fail_on_rank_1, "killed-mid-task": killed_mid_task}[sys.argv[1]](Path(sys.argv[2]))
