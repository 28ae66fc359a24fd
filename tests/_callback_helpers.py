"""Tiny LightningModules and data for the callback tests (module level, so ddp_spawn can pickle them)."""

from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

TASKS = ("alpha", "beta", "gamma")


class TaskModule(pl.LightningModule):
    def __init__(self, num_classes: int = 3):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 12), nn.Tanh())
        self.norm = nn.LayerNorm(12)
        self.head = nn.Linear(12, num_classes)

    def forward(self, x):
        return self.head(self.norm(self.body(x)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def pretrained_state() -> dict:
    torch.manual_seed(0)
    return {k: v.clone() for k, v in TaskModule().state_dict().items()}


def task_module(state: dict) -> TaskModule:
    module = TaskModule()
    module.load_state_dict(state)
    return module


def task_loader(index: int, num_classes: int = 3) -> DataLoader:
    g = torch.Generator().manual_seed(100 + index)
    x = torch.randn(64, 8, generator=g)
    y = torch.randint(0, num_classes, (64,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=False)


def trainer(root: Path, callbacks, **kwargs) -> pl.Trainer:
    options = dict(max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, default_root_dir=root)
    options.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **options)


class DumpWeights(Callback):
    """Each rank writes its module's weights at fit end (after the MergeCallback, which comes first)."""

    def __init__(self, folder: Path):
        self.folder = folder

    def on_fit_end(self, trainer, pl_module):
        state = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}
        torch.save(state, Path(self.folder) / f"rank{trainer.global_rank}.pt")


class CrashAtEpoch(Callback):
    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            raise RuntimeError("simulated crash")


class EncoderClassifier(pl.LightningModule):
    """An encoder (a transformers model, or a PeftModel around one; keys ``encoder.<its names>``) with a linear head
    per task: the shape of a user's LightningModule around a Hugging Face model."""

    def __init__(self, encoder, num_classes):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(32, num_classes)

    def forward(self, ids):
        return self.head(self.encoder(input_ids=ids).last_hidden_state[:, 0])

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=1e-2)


class IndexedData(pl.LightningDataModule):
    """``task_loader(index)`` as a datamodule (a LightningCLI ``--data.index``)."""

    def __init__(self, index: int = 0):
        super().__init__()
        self.index = index

    def train_dataloader(self):
        return task_loader(self.index)
