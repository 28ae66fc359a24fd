"""MergedEvalLoop, the scaling search and the report, on tiny models and data built here."""

import csv
import json
import random
import sys
from functools import partial

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics import MeanSquaredError
from torchmetrics.classification import MulticlassAccuracy

from lightning_merge import MergeCallback, get_method
from lightning_merge.engine import plan_merge, task_matrices
from lightning_merge.evaluation import (
    Accuracy,
    EvalResult,
    MergedEvalLoop,
    MergeReport,
    ShardSampler,
    apply_scaling,
    search_scaling,
)
from lightning_merge.evaluation._data import shard
from lightning_merge.io import open_source
from tests._eval_helpers import (
    BODY,
    CompareOnValidationStart,
    TinyNet,
    TrainableNet,
    Untouchable,
    accuracy_and_count,
    class_loader,
    dict_forward,
    make_class_problem,
    make_problem,
    merged_delta,
    probe,
    two_metrics,
)


def _hand_accuracy(model, head, loader):
    """Count correct arg-max predictions sample by sample, in plain Python."""
    probe = TinyNet()
    probe.load_state_dict({**model.state_dict(), **head})
    correct = total = 0
    for x, y in loader.dataset:
        logits = probe(x).tolist()
        correct += int(logits.index(max(logits)) == int(y))
        total += 1
    return correct / total


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------------- scoring

def test_scores_equal_hand_counted_accuracy_and_model_is_restored():
    p = make_problem()
    model = TinyNet().train()
    before = _state(model)
    result = MergedEvalLoop(p.test, p.heads).run(model)
    expected = {t: _hand_accuracy(model, p.heads[t], p.test[t]) for t in p.test}
    assert result.scores == {t: {"accuracy": pytest.approx(v, abs=1e-7)} for t, v in expected.items()}
    assert result.mean["accuracy"] == pytest.approx(sum(expected.values()) / 2, abs=1e-7)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.training


def test_metric_collections_per_task_and_the_primary_metric():
    p = make_problem()
    model = TinyNet()
    loop = MergedEvalLoop(p.test, p.heads, metrics={"a": two_metrics, "b": two_metrics}, metric="f1")
    result = loop.run(model)
    default = MergedEvalLoop(p.test, p.heads).run(model)
    assert loop.metric == "f1" and list(result.scores["a"]) == ["acc", "f1"]
    assert result.scores["b"]["acc"] == pytest.approx(default.scores["b"]["accuracy"])
    single = MergedEvalLoop(p.test, p.heads, metrics=partial(MulticlassAccuracy, num_classes=3))
    assert single.metric == "multiclass_accuracy"


def test_custom_forward_scores_other_batch_structures():
    p = make_problem()
    model = TinyNet()
    samples = {t: [{"x": x, "y": y} for x, y in loader.dataset] for t, loader in p.test.items()}
    dict_loaders = {t: DataLoader(s, batch_size=4) for t, s in samples.items()}
    result = MergedEvalLoop(dict_loaders, p.heads, forward=dict_forward).run(model)
    assert result == MergedEvalLoop(p.test, p.heads).run(model)


class _ListLogger(Logger):
    def __init__(self):
        super().__init__()
        self.logged = {}

    name, version, experiment = "list", 0, None

    def log_metrics(self, metrics, step=None):
        self.logged.update(metrics)

    def log_hyperparams(self, params, *args, **kwargs):
        pass


def test_scores_are_logged_to_the_trainers_loggers():
    p = make_problem()
    logger = _ListLogger()
    trainer = pl.Trainer(logger=logger, accelerator="cpu", devices=1, enable_progress_bar=False)
    result = MergedEvalLoop(p.test, p.heads, trainer=trainer).run(TinyNet())
    assert logger.logged["merged/a/accuracy"] == result.scores["a"]["accuracy"]
    assert logger.logged["merged/mean/accuracy"] == result.mean["accuracy"]


def test_shard_sampler_splits_without_padding():
    shards = [list(ShardSampler(7, 2, rank)) for rank in range(2)]
    assert shards == [[0, 2, 4, 6], [1, 3, 5]]
    loader = DataLoader(TensorDataset(torch.arange(7.0)), batch_size=3)
    assert [b[0].tolist() for b in shard(loader, 2, 1, "a")] == [[1.0, 3.0, 5.0]]
    assert shard(loader, 1, 0, "a") is loader


# ------------------------------------------------------------------------------------------ scaling search

def _threshold_task(thresholds):
    """One sample per threshold ``c``: class 0 is predicted iff ``lam > c``; the label picks the side."""
    x = torch.tensor([[1.0 / c] for c, _ in thresholds])
    y = torch.tensor([label for _, label in thresholds])
    return DataLoader(TensorDataset(x, y), batch_size=1)


def test_search_returns_the_known_best_grid_point():
    # logits = (lam * x, 1): task a is right only for lam in (0.5, 0.7), task b for lam in (0.3, 0.9)
    model = nn.Sequential(nn.Linear(1, 1, bias=False), nn.Linear(1, 2))
    head = {"1.weight": torch.tensor([[1.0], [0.0]]), "1.bias": torch.tensor([0.0, 1.0])}
    loaders = {"a": _threshold_task([(0.5, 0), (0.7, 1)]), "b": _threshold_task([(0.3, 0), (0.9, 1)])}
    loop = MergedEvalLoop(loaders, {"a": head, "b": head})
    base, delta = {"0.weight": torch.zeros(1, 1)}, {"0.weight": torch.ones(1, 1)}
    best, curve = search_scaling(loop, model, base, delta, grid=(0.2, 0.4, 0.6, 0.8, 1.0))
    assert best == 0.6
    assert curve == {0.2: 0.5, 0.4: 0.75, 0.6: 1.0, 0.8: 0.75, 1.0: 0.5}
    assert model[0].weight.item() == pytest.approx(0.6)


def test_search_leaves_exactly_the_weights_of_the_chosen_lam():
    p = make_problem()
    model = TinyNet()
    head_before = _state(model.head)
    rng = random.Random(0)
    grid = [rng.uniform(-1.0, 2.0) for _ in range(25)]
    best, curve = search_scaling(MergedEvalLoop(p.val, p.heads), model, p.base, p.merged_matrices["tsv_m"], grid)
    assert list(curve) == grid and best in grid
    for key in BODY:  # a fresh W0 + lam * M, not the end of 26 in-place updates
        assert torch.equal(model.state_dict()[key], p.base[key] + best * p.merged_matrices["tsv_m"][key])
    assert all(torch.equal(head_before[k], v) for k, v in model.head.state_dict().items())


def test_search_minimizes_a_lower_is_better_metric():
    x = torch.tensor([[1.0], [2.0]])
    loaders = {"a": DataLoader(TensorDataset(x, 0.5 * x), batch_size=2)}
    model = nn.Linear(1, 1, bias=False)
    loop = MergedEvalLoop(loaders, metrics=MeanSquaredError)
    base, delta = {"weight": torch.zeros(1, 1)}, {"weight": torch.ones(1, 1)}
    best, _ = search_scaling(loop, model, base, delta, (0.0, 0.5, 1.0))
    assert loop.metric == "mean_squared_error" and not loop.higher_is_better and best == 0.5


def test_apply_scaling_is_exact_however_often_it_is_called():
    layer = nn.Linear(6, 6)
    base, delta = {"weight": torch.randn(6, 6)}, {"weight": torch.randn(6, 6)}
    for lam in torch.rand(100).tolist():
        apply_scaling(layer, base, delta, lam)
    apply_scaling(layer, base, delta, 0.3)
    assert torch.equal(layer.weight.detach(), base["weight"] + 0.3 * delta["weight"])


# ------------------------------------------------------------------------------------------------- comparison

def test_compare_reports_references_normalized_scores_and_keeps_the_best():
    p = make_problem()
    model = TinyNet()
    head_before = _state(model.head)
    loop = MergedEvalLoop(p.test, p.heads)
    report = loop.compare(model, p.base, p.merged_matrices, p.finetuned, p.val, grid=(0.25, 0.5, 1.0), verbose=False)
    assert list(report.rows) == ["pretrained", "finetuned", "tsv_m", "task_arithmetic"]
    ft = report.rows["finetuned"].scores
    for task in p.test:
        own = TinyNet()
        own.load_state_dict({**own.state_dict(), **p.finetuned[task]})
        expected = _hand_accuracy(own, p.heads[task], p.test[task])
        assert ft[task]["accuracy"] == pytest.approx(expected, abs=1e-7)
        merged = report.rows["tsv_m"].scores[task]["accuracy"]
        assert report.normalized("tsv_m")[task] == pytest.approx(merged / ft[task]["accuracy"])
    best = report.best
    assert best in p.merged_matrices and report.scaling[best] in (0.25, 0.5, 1.0)
    for key in BODY:
        assert torch.equal(model.state_dict()[key], p.base[key] + report.scaling[best] * p.merged_matrices[best][key])
    assert all(torch.equal(head_before[k], v) for k, v in model.head.state_dict().items())


def _report():
    rows = {
        "pretrained": EvalResult({"a": {"accuracy": 0.25}, "b": {"accuracy": 0.5}}),
        "finetuned": EvalResult({"a": {"accuracy": 1.0}, "b": {"accuracy": 0.8}}),
        "tsv_m": EvalResult({"a": {"accuracy": 0.9}, "b": {"accuracy": 0.8}}),
    }
    return MergeReport("accuracy", rows, {"tsv_m": 0.5}, {"tsv_m": {0.5: 0.9, 1.0: 0.7}})


def test_report_table_csv_json_and_plot(tmp_path):
    report = _report()
    table = report.to_table().splitlines()
    assert table[0].split() == ["accuracy", "pretrained", "finetuned", "tsv_m", "tsv_m/ft"]
    assert table[3].split() == ["mean", "0.3750", "0.9000", "0.8500", "0.9500"]
    report.to_csv(tmp_path / "r.csv")
    rows = list(csv.DictReader(open(tmp_path / "r.csv")))
    mean = next(r for r in rows if r["model"] == "tsv_m" and r["task"] == "mean")
    assert float(mean["normalized"]) == pytest.approx(0.95) and float(mean["scaling"]) == 0.5
    report.to_json(tmp_path / "r.json")
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["curves"] == {"tsv_m": [[0.5, 0.9], [1.0, 0.7]]} and data["best"] == "tsv_m"
    pytest.importorskip("matplotlib")
    report.plot(tmp_path / "r.png")
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


def test_plot_without_matplotlib_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"pip install lightning-merge\[plot\]"):
        _report().plot(tmp_path / "r.png")


# ---------------------------------------------------------------------------------------------------- errors

def _preds_only(model, batch):
    return model(batch[0])


def _bad_batches():
    return {"a": DataLoader([{"x": torch.zeros(4)}], batch_size=1)}


@pytest.mark.parametrize(
    ("build", "error", "match"),
    [
        (lambda p: MergedEvalLoop(p.test, {"a": p.heads["a"]}), ValueError, "`heads`.*task 'b'"),
        (lambda p: MergedEvalLoop(p.test, p.heads, metrics={"a": Accuracy}), ValueError, "`metrics`.*'b'"),
        (lambda p: MergedEvalLoop(p.test, p.heads, metrics=dict), TypeError, "Metric.*task 'a'.*dict"),
        (lambda p: MergedEvalLoop(p.test, p.heads, metric="f1"), ValueError, "`metric`.*task 'a'.*'f1'"),
        (lambda p: MergedEvalLoop({}, p.heads), TypeError, "`dataloaders`"),
    ],
)
def test_constructor_errors_name_the_task(build, error, match):
    with pytest.raises(error, match=match):
        build(make_problem())


def test_run_errors_name_the_task():
    p = make_problem()
    bad_head = {**p.heads, "b": {"head.weigth": torch.zeros(3, 5)}}
    with pytest.raises(ValueError, match=r"`heads\['b'\]`.*'head.weigth'"):
        MergedEvalLoop(p.test, bad_head).run(TinyNet())
    with pytest.raises(TypeError, match=r"task 'a'.*\(inputs, target\).*a dict.*HINT: pass `forward=`"):
        MergedEvalLoop(_bad_batches()).run(TinyNet())
    with pytest.raises(TypeError, match=r"`forward`.*\(preds, target\).*task 'a'"):
        MergedEvalLoop(p.test, p.heads, forward=_preds_only).run(TinyNet())
    empty = {**p.test, "b": DataLoader(TensorDataset(torch.zeros(0, 4), torch.zeros(0)), batch_size=2)}
    with pytest.raises(ValueError, match="task 'b'.*empty"):
        MergedEvalLoop(empty, p.heads).run(TinyNet())


def test_search_and_compare_validate_their_inputs():
    p = make_problem()
    loop, model = MergedEvalLoop(p.val, p.heads), TinyNet()
    with pytest.raises(ValueError, match="`grid`.*non-empty"):
        search_scaling(loop, model, p.base, p.merged_matrices["tsv_m"], grid=())
    with pytest.raises(ValueError, match="`base` and `merged_matrices\\['x'\\]`.*'body.bias'"):
        loop.compare(model, p.base, {"x": {"body.weight": p.merged_matrices["tsv_m"]["body.weight"]}})
    extra = {**p.finetuned, "a": {**p.finetuned["a"], "other": torch.zeros(1)}}
    with pytest.raises(ValueError, match=r"`finetuned\['a'\]`.*'other'.*HINT"):
        loop.compare(model, p.base, p.merged_matrices, extra)


# ------------------------------------------------------------------------------------------------ distributed

def test_ddp_spawn_gives_the_numbers_of_one_process(tmp_path):
    p = make_problem()  # 13/11 test and 9/7 validation samples: uneven shards over two ranks
    model = TinyNet()
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1,
        callbacks=[CompareOnValidationStart(p, str(tmp_path))],
    )
    dummy = DataLoader(TensorDataset(torch.zeros(2, 4), torch.zeros(2)), batch_size=1)
    trainer.validate(model, dummy, verbose=False)
    loop = MergedEvalLoop(p.test, p.heads, metrics=accuracy_and_count)
    report = loop.compare(model, p.base, p.merged_matrices, p.finetuned, p.val, grid=(0.5, 1.0))
    assert report.rows["tsv_m"].scores["a"]["count"] == 13  # every sample once: no duplicates, no padding
    state = {k: v.tolist() for k, v in model.state_dict().items()}
    for rank in range(2):
        out = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert out["world_size"] == 2
        assert out["report"] == report.to_dict()
        assert out["state"] == state


# ------------------------------------------------------------------------------------- heads of any shape

def _accuracy_of(body, head, loader):
    net = probe(body, head)
    x, y = loader.dataset.tensors
    return (net(x).argmax(-1) == y).double().mean().item()


def test_heads_with_other_class_counts_are_swapped_in_and_the_models_own_restored():
    p = make_class_problem()  # tasks of 2 and 3 classes; the model's own head has 4
    model = TinyNet(classes=4).train()
    own_weight, before = model.head.weight, _state(model)
    result = MergedEvalLoop(p.test, p.heads).run(model)
    body = {k: v for k, v in model.state_dict().items() if k in BODY}
    for task in p.test:
        expected = _accuracy_of(body, p.heads[task], p.test[task])
        assert result.scores[task]["accuracy"] == pytest.approx(expected, abs=1e-7)
    assert model.head.weight is own_weight and model.head.out_features == 4 and model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_compare_with_heads_of_other_shapes_scores_every_row():
    p = make_class_problem()
    model = TinyNet(classes=3)
    loop = MergedEvalLoop(p.test, p.heads)
    report = loop.compare(model, p.base, p.merged_matrices, p.finetuned, p.val, grid=(0.5, 1.0), verbose=False)
    assert list(report.rows) == ["pretrained", "finetuned", "tsv_m", "task_arithmetic"]
    for task in p.test:
        own = report.rows["finetuned"].scores[task]["accuracy"]
        assert own == pytest.approx(_accuracy_of(p.finetuned[task], p.heads[task], p.test[task]), abs=1e-7)
        assert report.rows["pretrained"].scores[task]["accuracy"] == pytest.approx(
            _accuracy_of(p.base, p.heads[task], p.test[task]), abs=1e-7)
    assert model.head.out_features == 3 and model.head.weight.shape == (3, 5)


@pytest.mark.parametrize(
    ("head", "match"),
    [
        ({"head.weight": torch.zeros(2, 5), "head.bias": torch.zeros(3)},
         r"module 'head' in `heads\['three'\]`.*'head.weight': \(2, 5\), 'head.bias': \(3,\)"),
        ({"head.weight": torch.zeros(3, 4)},
         r"`heads\['three'\]\['head.weight'\]`.*\(classes, 5\).*but got \(3, 4\)"),
        ({"head.bias": torch.zeros(3, 1)}, r"`heads\['three'\]\['head.bias'\]`.*\(classes,\).*but got \(3, 1\)"),
        ({"head.bias": torch.zeros(3, dtype=torch.int64)}, r"`heads\['three'\]\['head.bias'\]`.*floating.*int64"),
        ({"head.weigth": torch.zeros(3, 5)}, r"`heads\['three'\]`.*'head.weigth'"),
    ],
)
def test_heads_are_checked_before_any_work_naming_task_key_and_expectation(head, match):
    p = make_class_problem()
    heads = {**p.heads, "three": head}
    untouchable = {task: Untouchable() for task in p.test}
    with pytest.raises(ValueError, match=match):
        MergedEvalLoop(untouchable, heads).run(TinyNet())
    with pytest.raises(ValueError, match=match):
        MergedEvalLoop(untouchable, heads).compare(TinyNet(), p.base, p.merged_matrices, p.finetuned, untouchable)


class _NotMergedYet:
    heads: dict = {}
    plan = base_source = None
    task_sources: dict = {}

    def task_matrices(self, methods, *, progress=True):
        raise AssertionError("not to be called")


class _Merged:
    """What a MergeCallback holds after merging; its ``task_matrices`` must come after the checks."""

    def __init__(self, p):
        self.heads = p.heads
        self.plan = plan_merge(open_source(p.base), [open_source(s) for s in p.finetuned.values()], strict=False)
        self.base_source = open_source(p.base)
        self.task_sources = {t: open_source(s) for t, s in p.finetuned.items()}
        self.calls = []

    def task_matrices(self, methods, *, progress=True):
        self.calls.append((list(methods), progress))
        return {m: merged_delta(get_method(m), {k: self.base_source.get_tensor(k) for k in BODY},
                                {t: {k: s.get_tensor(k) for k in BODY} for t, s in self.task_sources.items()})
                for m in methods}


def test_compare_callback_checks_heads_and_keys_before_the_task_matrices():
    p = make_class_problem()
    with pytest.raises(ValueError, match="has not merged.*HINT"):
        MergedEvalLoop.from_callback(_NotMergedYet(), p.test)
    merge = _Merged(p)
    with pytest.raises(ValueError, match=r"`dataloaders` to name tasks that `merge` merged \['two', 'three'\].*'four'"):
        MergedEvalLoop.from_callback(merge, {**p.test, "four": p.test["two"]})
    bad = MergedEvalLoop(p.test, {**p.heads, "two": {"head.weight": torch.zeros(2, 4)}})
    with pytest.raises(ValueError, match=r"`heads\['two'\]\['head.weight'\]`"):
        bad.compare_callback(TinyNet(), merge, ["tsv_m"])
    renamed = TinyNet()
    renamed.trunk = renamed.body
    del renamed.body
    with pytest.raises(ValueError, match=r"`merge.plan.merge_keys`.*'body.weight'"):
        MergedEvalLoop.from_callback(merge, p.test).compare_callback(renamed, merge, ["tsv_m"])
    assert merge.calls == []
    report = MergedEvalLoop.from_callback(merge, p.test).compare_callback(
        TinyNet(), merge, ["tsv_m"], p.val, grid=(0.5, 1.0), progress=False, verbose=False)
    assert merge.calls == [(["tsv_m"], False)] and list(report.rows) == ["pretrained", "finetuned", "tsv_m"]


def test_from_callback_and_compare_callback_on_a_merge_callback_run(tmp_path):
    torch.manual_seed(0)
    pretrained = {k: v for k, v in TrainableNet().state_dict().items() if k in BODY}
    merge = MergeCallback("tsv_m", tasks=["two", "three"], exclude=["head.*"], progress=False)
    gen, test, val = torch.Generator().manual_seed(1), {}, {}
    for task, classes in zip(merge.tasks, (2, 3), strict=True):
        model = TrainableNet(classes=classes)
        model.load_state_dict(pretrained, strict=False)
        teacher = TinyNet(classes=classes)
        train, test[task], val[task] = (class_loader(teacher, n, gen) for n in (32, 13, 9))
        pl.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                   callbacks=[merge]).fit(model, train)
    own_head = _state(model.head)
    loop = MergedEvalLoop.from_callback(merge, test)
    report = loop.compare_callback(model, merge, methods=["tsv_m", "sftm"], val_dataloaders=val, grid=(0.5, 1.0),
                                   progress=False, verbose=False)
    assert list(report.rows) == ["pretrained", "finetuned", "tsv_m", "sftm"]
    keys = list(merge.plan.merge_keys)
    base = {k: merge.base_source.get_tensor(k) for k in keys}
    matrix = dict(task_matrices(get_method("tsv_m"), merge.base_source, list(merge.task_sources.values()), keys))
    lam = report.scaling["tsv_m"]
    for task, source in merge.task_sources.items():
        ft = {k: source.get_tensor(k) for k in keys}
        expected = _accuracy_of(ft, merge.heads[task], test[task])
        assert report.rows["finetuned"].scores[task]["accuracy"] == pytest.approx(expected, abs=1e-7)
        at_lam = {k: base[k] + lam * matrix[k] for k in keys}
        expected = _accuracy_of(at_lam, merge.heads[task], test[task])
        assert report.rows["tsv_m"].scores[task]["accuracy"] == pytest.approx(expected, abs=1e-6)
    assert all(torch.equal(own_head[k], v) for k, v in model.head.state_dict().items())
