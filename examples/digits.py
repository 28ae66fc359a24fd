"""Tasks, model and data of the examples: scikit-learn's bundled handwritten digits, no download.

The 1797 8x8 digit images ship inside scikit-learn. A task is one of the eight symmetries of the square (the
dihedral group D4) applied to every image: the digit must be recognised in that orientation. The pre-trained model
has seen the four rotations with one shared head; each task fine-tunes the whole network with its own head, so the
fine-tunes pull the shared body in different directions and merging them has real interference to resolve.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from sklearn.datasets import load_digits
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset


def identity(x: Tensor) -> Tensor:
    return x


def rot90(x: Tensor) -> Tensor:
    return x.rot90(1, (1, 2))


def rot180(x: Tensor) -> Tensor:
    return x.rot90(2, (1, 2))


def rot270(x: Tensor) -> Tensor:
    return x.rot90(3, (1, 2))


def flip_lr(x: Tensor) -> Tensor:
    return x.flip(2)


def flip_ud(x: Tensor) -> Tensor:
    return x.flip(1)


def transpose(x: Tensor) -> Tensor:
    return x.transpose(1, 2)


def anti_transpose(x: Tensor) -> Tensor:
    return x.rot90(1, (1, 2)).flip(1)


TASKS = {f.__name__: f for f in (identity, rot90, rot180, rot270, flip_lr, flip_ud, transpose, anti_transpose)}
PRETRAIN = ("identity", "rot90", "rot180", "rot270")


class Digits:
    """The digits split once (60% train, 20% validation, 20% test, fixed seed), transformed per task."""

    def __init__(self, seed: int = 0, batch_size: int = 64) -> None:
        images, labels = load_digits(return_X_y=True)
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
        self.images = torch.tensor(images, dtype=torch.float32)[order].view(-1, 8, 8) / 16.0
        self.labels = torch.tensor(labels)[order]
        n = len(self.labels)
        self.splits = {"train": slice(0, int(0.6 * n)), "val": slice(int(0.6 * n), int(0.8 * n)),
                       "test": slice(int(0.8 * n), n)}
        self.batch_size = batch_size

    def dataset(self, task: str, split: str) -> TensorDataset:
        part = self.splits[split]
        return TensorDataset(TASKS[task](self.images[part]).reshape(-1, 64), self.labels[part])

    def loader(self, task: str, split: str, shuffle: bool = False) -> DataLoader:
        return DataLoader(self.dataset(task, split), batch_size=self.batch_size, shuffle=shuffle)

    def pretrain_loader(self) -> DataLoader:
        parts = [self.dataset(task, "train") for task in PRETRAIN]
        data = TensorDataset(torch.cat([p.tensors[0] for p in parts]), torch.cat([p.tensors[1] for p in parts]))
        return DataLoader(data, batch_size=self.batch_size, shuffle=True)


class DigitNet(pl.LightningModule):
    """An MLP body (64 -> 256 -> 256 -> 128) shared by the tasks and a linear head of each task's own."""

    def __init__(self, lr: float = 1e-3) -> None:
        super().__init__()
        self.lr = lr
        self.body = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(),
                                  nn.Linear(256, 128), nn.GELU())
        self.head = nn.Linear(128, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)
