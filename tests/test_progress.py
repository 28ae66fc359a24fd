"""The engine's progress bar advances by the work of each key (the method's cost model), not by its bytes."""

from __future__ import annotations

import io

import pytest
import torch
from tqdm.auto import tqdm as real_tqdm

from lightning_merge.engine import merge_checkpoints, merge_keys, stream, task_matrices
from lightning_merge.io import open_source
from lightning_merge.methods import get_method

T = 2


class RecordingBar:
    """A stand-in for tqdm: records the total, every update and every postfix."""

    bars: list[RecordingBar] = []

    def __init__(self, total=None, disable=False, **kwargs):
        self.total, self.disable, self.kwargs = total, disable, kwargs
        self.updates: list[float] = []
        self.postfixes: list[str] = []
        RecordingBar.bars.append(self)

    def update(self, n=1):
        self.updates.append(n)

    def set_postfix_str(self, s="", refresh=True):
        self.postfixes.append(s)

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@pytest.fixture
def bars(monkeypatch):
    RecordingBar.bars = []
    monkeypatch.setattr(stream, "tqdm", RecordingBar)
    return RecordingBar.bars


def embedding_model(seed: int) -> dict[str, torch.Tensor]:
    """A vocabulary-sized embedding next to small layers: the embedding is most of the merge's work."""
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(600, 16, generator=g),
        "layer.weight": torch.randn(16, 16, generator=g),
        "layer.bias": torch.randn(16, generator=g),
        "position_ids": torch.arange(8),
    }


def sources():
    return open_source(embedding_model(0)), [open_source(embedding_model(s)) for s in range(1, T + 1)]


@pytest.mark.parametrize("name", ["average", "tsv_m"])
def test_merge_keys_bar_moves_by_the_cost_of_each_key(bars, name):
    method, (base, tuned) = get_method(name), sources()
    keys = ["embed.weight", "layer.weight", "layer.bias"]
    list(merge_keys(method, base, tuned, keys, progress=True))
    (bar,) = bars
    costs = [method.cost(base.shape(k), T) for k in keys]
    assert bar.total == pytest.approx(sum(costs)) and not bar.disable
    assert bar.updates == pytest.approx(costs)
    assert bar.postfixes == keys  # the key being merged is shown
    share = bar.updates[0] / bar.total
    assert share > 0.85  # the embedding is ~90% of the work, so it moves the bar by ~90%, not by its bytes' 1%


def test_copied_keys_cost_their_elements(bars, tmp_path):
    method, (base, tuned) = get_method("average"), sources()
    merge_checkpoints(method, base, tuned, tmp_path / "out", exclude=["layer.bias"], progress=True, input_hash=None)
    (bar,) = bars
    costs = {"embed.weight": method.cost((600, 16), T), "layer.weight": method.cost((16, 16), T),
             "layer.bias": 16.0, "position_ids": 8.0}  # excluded and integer keys: copied, one unit per element
    assert dict(zip(bar.postfixes, bar.updates, strict=True)) == pytest.approx(costs)
    assert bar.total == pytest.approx(sum(costs.values()))


def test_task_matrices_has_the_same_bar(bars):
    method, (base, tuned) = get_method("tsv_m"), sources()
    keys = ["embed.weight", "layer.weight"]
    list(task_matrices(method, base, tuned, keys))
    assert bars[0].disable  # off by default
    list(task_matrices(method, base, tuned, keys, progress=True))
    bar = bars[1]
    costs = [method.cost(base.shape(k), T) for k in keys]
    assert not bar.disable and bar.total == pytest.approx(sum(costs)) and bar.updates == pytest.approx(costs)
    assert bar.postfixes == keys and "task matrices (tsv_m)" in bar.kwargs["desc"]


def test_the_real_bar_shows_the_key_and_finishes_at_100_percent(monkeypatch):
    out = io.StringIO()
    shown = {"file": out, "mininterval": 0, "ncols": 200, "leave": True}
    monkeypatch.setattr(stream, "tqdm", lambda **kw: real_tqdm(**{**kw, **shown}))
    base, tuned = sources()
    list(merge_keys(get_method("average"), base, tuned, ["embed.weight", "layer.weight"], progress=True))
    text = out.getvalue()
    assert "merging (average)" in text and "embed.weight" in text and "layer.weight" in text and "100%" in text
