"""Tiny models, data and a DDP callback for tests/test_evaluation.py (module level, for ``ddp_spawn``)."""

import dataclasses
import json
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from lightning_merge import get_method
from lightning_merge.evaluation import Accuracy, MergedEvalLoop

BODY = ("body.weight", "body.bias")


class TinyNet(pl.LightningModule):
    """``head(relu(body(x)))``: the body is merged, the head is task-specific."""

    def __init__(self, in_features: int = 4, hidden: int = 5, classes: int = 3) -> None:
        super().__init__()
        self.body = nn.Linear(in_features, hidden)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        return self.head(torch.relu(self.body(x)))

    def validation_step(self, batch, batch_idx):
        return None


def two_metrics():
    acc = MulticlassAccuracy(num_classes=3, average="micro")
    return MetricCollection({"acc": acc, "f1": MulticlassF1Score(num_classes=3)})


class SampleCount(Metric):
    """The number of samples scored, summed over ranks: a duplicated or padded shard would change it."""

    def __init__(self):
        super().__init__()
        self.add_state("count", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, preds, target):
        self.count += target.numel()

    def compute(self):
        return self.count


def accuracy_and_count():
    return MetricCollection({"accuracy": Accuracy(), "count": SampleCount()})


def dict_forward(model, batch):
    return model(batch["x"]), batch["y"]


@dataclasses.dataclass
class Problem:
    """Two tasks fine-tuned from one base; ``merged_matrices`` are two methods' merged task matrices (scaling 1)."""

    base: dict
    finetuned: dict
    heads: dict
    merged_matrices: dict
    test: dict
    val: dict


def _labels(model, state, head, x, flip):
    probe = TinyNet()
    probe.load_state_dict({**state, **head})
    y = probe(x).argmax(-1)
    y[:flip] = (y[:flip] + 1) % 3  # a few wrong labels, so the fine-tuned model is not perfect
    return y


def make_problem(sizes=(("a", 13, 9), ("b", 11, 7)), batch_size=4, seed=0) -> Problem:
    gen = torch.Generator().manual_seed(seed)
    net = TinyNet()
    base = {k: v.detach().clone() for k, v in net.state_dict().items() if k in BODY}
    finetuned, heads, test, val = {}, {}, {}, {}
    for i, (task, n_test, n_val) in enumerate(sizes):
        finetuned[task] = {k: v + 0.5 * torch.randn(v.shape, generator=gen) for k, v in base.items()}
        heads[task] = {
            "head.weight": torch.randn(3, 5, generator=gen),
            "head.bias": torch.randn(3, generator=gen),
        }
        x = torch.randn(n_test + n_val, 4, generator=gen)
        y = _labels(net, finetuned[task], heads[task], x, flip=i + 1)
        test[task] = DataLoader(TensorDataset(x[:n_test], y[:n_test]), batch_size=batch_size)
        val[task] = DataLoader(TensorDataset(x[n_test:], y[n_test:]), batch_size=batch_size)
    merged_matrices = {name: merged_delta(get_method(name), base, finetuned) for name in ("tsv_m", "task_arithmetic")}
    return Problem(base, finetuned, heads, merged_matrices, test, val)


def merged_delta(method, base, finetuned):
    """``M`` per key, computed once with scaling 1."""
    method = method.with_scaling(1.0)
    return {k: method.merge([ft[k] - base[k] for ft in finetuned.values()]) for k in base}


class CompareOnValidationStart(pl.Callback):
    """Runs ``MergedEvalLoop.compare`` under the strategy; writes each rank's report and weights as JSON."""

    def __init__(self, problem: Problem, out_dir: str, grid=(0.5, 1.0)) -> None:
        self.problem, self.out_dir, self.grid = problem, out_dir, grid

    def on_validation_start(self, trainer, pl_module):
        p = self.problem
        loop = MergedEvalLoop(p.test, p.heads, metrics=accuracy_and_count, trainer=trainer)
        report = loop.compare(pl_module, p.base, p.merged_matrices, p.finetuned, p.val, grid=self.grid)
        state = {k: v.tolist() for k, v in pl_module.state_dict().items()}
        out = {"report": report.to_dict(), "state": state, "world_size": trainer.world_size}
        Path(self.out_dir, f"rank{trainer.global_rank}.json").write_text(json.dumps(out))


class TrainableNet(TinyNet):
    """:class:`TinyNet` that ``Trainer.fit`` can fine-tune (for the MergeCallback runs)."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def probe(body: dict, head: dict) -> TinyNet:
    """A TinyNet with ``body`` and ``head`` loaded, its class count the head's."""
    net = TinyNet(classes=head["head.weight"].shape[0])
    net.load_state_dict({**body, **head})
    return net


def class_loader(net: nn.Module, n: int, gen: torch.Generator, batch_size: int = 4) -> DataLoader:
    """``n`` samples labelled by ``net``'s arg-max, the first two relabelled so that ``net`` is not perfect."""
    x = torch.randn(n, 4, generator=gen)
    with torch.no_grad():
        logits = net(x)
    y = logits.argmax(-1)
    y[:2] = (y[:2] + 1) % logits.shape[-1]
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def make_class_problem(classes=(("two", 2), ("three", 3)), seed=0) -> Problem:
    """Tasks with different numbers of classes (heads of shapes ``(c, 5)`` and ``(c,)``); ``finetuned[t]`` holds the
    body and the head, as the README's snippet builds it."""
    gen = torch.Generator().manual_seed(seed)
    base = {k: v.detach().clone() for k, v in TinyNet().state_dict().items() if k in BODY}
    finetuned, heads, test, val = {}, {}, {}, {}
    for task, c in classes:
        body = {k: v + 0.5 * torch.randn(v.shape, generator=gen) for k, v in base.items()}
        heads[task] = {"head.weight": torch.randn(c, 5, generator=gen), "head.bias": torch.randn(c, generator=gen)}
        finetuned[task] = {**body, **heads[task]}
        net = probe(body, heads[task])
        test[task], val[task] = class_loader(net, 13, gen), class_loader(net, 9, gen)
    bodies = {t: {k: s[k] for k in BODY} for t, s in finetuned.items()}
    merged_matrices = {name: merged_delta(get_method(name), base, bodies) for name in ("tsv_m", "task_arithmetic")}
    return Problem(base, finetuned, heads, merged_matrices, test, val)


class Untouchable:
    """A dataloader that fails the test when iterated: the checks must come before any evaluation work."""

    def __iter__(self):
        raise AssertionError("a dataloader was iterated before the heads were checked")
