"""LoRA: the same flow with per-task peft LoRA adapters on a transformers model built locally (no download),
producing one merged adapter.

    python examples/lora_merge.py [--fast] [--out runs/lora_merge]

1. Build a tiny Llama (``transformers.LlamaModel`` from a config, no download) that reads an 8x8 digit image as a
   sequence of 8 row-tokens (a linear embedding of each row) and classifies it from the last position; pre-train
   the whole model on the digits in four orientations (scikit-learn's bundled digits, see digits.py).
2. Fine-tune one peft LoRA adapter per task (orientations the pre-trained model has not seen), one ordinary
   ``Trainer.fit`` each, with one ``MergeCallback``: it records each task's adapter and, when the last fit ends,
   merges the adapters in low-rank form (TSV-M on ``scale * B @ A``, not on the factors separately) into
   ``<out>/merge/merged_adapter``, a peft adapter folder, and leaves the last module computing ``W0 + M``.
3. Print a per-task table of test accuracies: the pre-trained model, the task's own adapter and the merged adapter
   (loaded back with ``PeftModel.from_pretrained``).

About 3 minutes on 2 CPU cores; ``--fast`` (fewer steps, four tasks) takes about 30 seconds.
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import peft
import torch
import transformers
from digits import PRETRAIN, Digits
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from lightning_merge import MergeCallback

LORA_TASKS = ("flip_lr", "flip_ud", "transpose", "anti_transpose", "identity", "rot90", "rot180", "rot270")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class RowTransformer(pl.LightningModule):
    """A digit as 8 row-tokens: ``Linear(8, d)`` embeds each row, a tiny Llama reads them, a head classifies."""

    def __init__(self, lr: float = 3e-3) -> None:
        super().__init__()
        self.lr = lr
        config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=4, vocab_size=16)
        self.embed = nn.Linear(8, 64)
        self.body: nn.Module = transformers.LlamaModel(config)
        self.head = nn.Linear(64, 10)

    def forward(self, x: Tensor) -> Tensor:
        hidden = self.body(inputs_embeds=self.embed(x.view(-1, 8, 8))).last_hidden_state
        return self.head(hidden[:, -1])

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr)


def with_lora(pretrained: dict[str, Tensor]) -> RowTransformer:
    """The pre-trained model with a fresh LoRA adapter on its transformer; only the factors train."""
    model = RowTransformer(lr=5e-3)
    model.load_state_dict(pretrained)
    model.embed.requires_grad_(False)
    model.head.requires_grad_(False)
    model.body = peft.get_peft_model(model.body, peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    return model


def with_adapter(pretrained: dict[str, Tensor], folder: Path) -> RowTransformer:
    """The pre-trained model with a saved adapter loaded by peft."""
    model = RowTransformer()
    model.load_state_dict(pretrained)
    model.body = peft.PeftModel.from_pretrained(model.body, folder)
    return model


def trainer(out: Path, steps: int) -> pl.Trainer:
    return pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=out)


def accuracy(model: nn.Module, loader: DataLoader) -> float:
    model.eval()
    with torch.no_grad():
        hits = sum(int((model(x).argmax(-1) == y).sum()) for x, y in loader)
    return hits / len(loader.dataset)


def pretrain(data: Digits, out: Path, steps: int) -> dict[str, Tensor]:
    model = RowTransformer()
    trainer(out, steps).fit(model, data.pretrain_loader())
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def fine_tune(
    data: Digits, pretrained: dict[str, Tensor], tasks: list[str], out: Path, steps: int
) -> tuple[MergeCallback, RowTransformer]:
    merge = MergeCallback("tsv_m", tasks=tasks, dirpath=out / "merge", progress=False)
    for i, task in enumerate(tasks):
        start = time.perf_counter()
        model = with_lora(pretrained)  # every task starts from the pre-trained weights and a fresh adapter
        fit = trainer(out, steps)
        fit.callbacks.append(merge)
        fit.fit(model, data.loader(task, "train", shuffle=True))
        print(f"[{i + 1}/{len(tasks)}] LoRA-tuned {task:<15} {time.perf_counter() - start:5.1f} s", flush=True)
    return merge, model


def table(data: Digits, pretrained: dict[str, Tensor], tasks: list[str], merge_dir: Path) -> list[list[float]]:
    base = RowTransformer()
    base.load_state_dict(pretrained)
    merged = with_adapter(pretrained, merge_dir / "merged_adapter")
    rows = []
    for i, task in enumerate(tasks):
        loader = data.loader(task, "test")
        own = with_adapter(pretrained, merge_dir / f"task-{i:02d}-{task}")
        rows.append([accuracy(base, loader), accuracy(own, loader), accuracy(merged, loader)])
    return rows


def print_table(tasks: list[str], rows: list[list[float]]) -> None:
    print(f"{'accuracy':<16}{'base':>8}{'own adapter':>14}{'merged adapter':>17}")
    for task, (base, own, merged) in zip(tasks, rows, strict=True):
        print(f"{task:<16}{base:>8.3f}{own:>14.3f}{merged:>17.3f}")
    means = [sum(col) / len(col) for col in zip(*rows, strict=True)]
    print(f"{'mean':<16}{means[0]:>8.3f}{means[1]:>14.3f}{means[2]:>17.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast", action="store_true", help="a short version (fewer steps, four tasks)")
    parser.add_argument("--out", type=Path, default=Path("runs/lora_merge"), help="where files are written")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecation notices
    pl.seed_everything(args.seed, verbose=False)
    pre_steps, ft_steps, tasks = (200, 50, list(LORA_TASKS[:4])) if args.fast else (1000, 200, list(LORA_TASKS))
    start = time.perf_counter()
    data = Digits(seed=args.seed)
    pretrained = pretrain(data, args.out, pre_steps)
    print(f"pre-trained on {', '.join(PRETRAIN)} in {time.perf_counter() - start:.1f} s", flush=True)
    merge, last = fine_tune(data, pretrained, tasks, args.out, ft_steps)
    print(f"MergeCallback merged {len(tasks)} LoRA adapters with tsv_m in {merge.merge_seconds:.2f} s", flush=True)
    rows = table(data, pretrained, tasks, args.out / "merge")
    print_table(tasks, rows)
    loader = data.loader(tasks[-1], "test")
    print(f"the last module now computes W0 + M: accuracy {accuracy(last, loader):.3f} on {tasks[-1]}"
          f" (merged adapter: {rows[-1][2]:.3f})")
    print(f"done in {time.perf_counter() - start:.0f} s; merged adapter in {args.out / 'merge' / 'merged_adapter'}")


if __name__ == "__main__":
    main()
