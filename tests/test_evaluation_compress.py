"""Task-routed TSV-C rows in MergedEvalLoop and MergeReport: each task scored with ``W0 + trunc_k(D_t)`` and its head,
beside the merged rows, with the retained score per task (routed / own fine-tune)."""

import csv
import json

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_merge import MergeCallback, get_method
from lightning_merge.compress import TSVC, load_compressed
from lightning_merge.engine import plan_merge
from lightning_merge.evaluation import EvalResult, MergedEvalLoop, MergeReport
from lightning_merge.io import open_source
from tests._eval_helpers import BODY, TinyNet, TrainableNet, Untouchable, class_loader, merged_delta, probe

TASKS = ("a", "b")


def truncation(delta, k):
    """The rank-``k`` truncation in float64, written plainly (the reference)."""
    U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)
    return ((U[:, :k] * S[:k]) @ Vh[:k]).float()


def accuracy(body, head, loader):
    net = probe(body, head)
    with torch.no_grad():
        hits = sum(int((net(x).argmax(-1) == y).sum()) for x, y in loader)
    return hits / len(loader.dataset)


class Problem:
    """Two tasks whose body updates are full rank (4) and large: a rank-1 truncation loses a lot, full rank nothing.
    Labels are the own fine-tune's predictions, so its accuracy is 1.0."""

    def __init__(self, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.base = {"body.weight": torch.randn(5, 4, generator=g), "body.bias": torch.zeros(5)}
        self.finetuned, self.heads, self.test, self.val = {}, {}, {}, {}
        for task in TASKS:
            body = {"body.weight": self.base["body.weight"] + 2.0 * torch.randn(5, 4, generator=g),
                    "body.bias": 0.3 * torch.randn(5, generator=g)}
            self.heads[task] = {"head.weight": torch.randn(3, 5, generator=g), "head.bias": torch.zeros(3)}
            self.finetuned[task] = body
            net = probe(body, self.heads[task])
            for split, n in ((self.test, 200), (self.val, 50)):
                x = torch.randn(n, 4, generator=g)
                with torch.no_grad():
                    split[task] = DataLoader(TensorDataset(x, net(x).argmax(-1)), batch_size=32)
        self.merged = {"tsv_m": merged_delta(get_method("tsv_m"), self.base, self.finetuned)}

    def updates(self, k):
        """``{task: {key: trunc_k(D_t)}}`` (the bias update whole), computed here."""
        return {t: {"body.weight": truncation(ft["body.weight"] - self.base["body.weight"], k),
                    "body.bias": ft["body.bias"] - self.base["body.bias"]} for t, ft in self.finetuned.items()}


class Merged:
    """What a MergeCallback holds after merging the problem's tasks; counts ``task_matrices`` calls."""

    def __init__(self, p):
        self.heads = p.heads
        self.base_source = open_source(p.base)
        self.task_sources = {t: open_source(s) for t, s in p.finetuned.items()}
        self.plan = plan_merge(self.base_source, list(self.task_sources.values()))
        self.calls = 0

    def task_matrices(self, methods, *, progress=True):
        self.calls += 1
        base = {k: self.base_source.get_tensor(k) for k in BODY}
        tasks = {t: {k: s.get_tensor(k) for k in BODY} for t, s in self.task_sources.items()}
        return {m: merged_delta(get_method(m), base, tasks) for m in methods}


def test_full_rank_routed_row_is_the_own_fine_tune_and_rank_one_keeps_less():
    p = Problem()
    model = TinyNet()
    loop = MergedEvalLoop(p.test, p.heads)
    report = loop.compare_callback(model, Merged(p), ["tsv_m"], p.val, grid=(0.5, 1.0), progress=False,
                                   verbose=False, compressed={"tsv_c_full": TSVC(rank=1.0), "tsv_c_1": {"rank": 1}})
    assert list(report.rows) == ["pretrained", "finetuned", "tsv_m", "tsv_c_full", "tsv_c_1"]
    assert report.methods == ["tsv_m"] and report.routed == ["tsv_c_full", "tsv_c_1"] and report.best == "tsv_m"
    ft = report.rows["finetuned"].scores
    assert all(ft[t]["accuracy"] == 1.0 for t in TASKS)
    assert report.rows["tsv_c_full"].scores == ft and report.retained("tsv_c_full") == {"a": 1.0, "b": 1.0}
    for task, update in p.updates(1).items():
        body = {k: p.base[k] + update[k] for k in BODY}
        expected = accuracy(body, p.heads[task], p.test[task])
        assert report.rows["tsv_c_1"].scores[task]["accuracy"] == pytest.approx(expected, abs=1e-7)
        assert report.retained("tsv_c_1")[task] == pytest.approx(expected) and expected < 0.9
    # the model is left at the best method's lam, its own head restored
    lam = report.scaling["tsv_m"]
    for key in BODY:
        assert torch.allclose(model.state_dict()[key], p.base[key] + lam * p.merged["tsv_m"][key])


def test_compare_scores_given_updates_and_the_report_shows_retained_everywhere(tmp_path):
    p = Problem()
    loop = MergedEvalLoop(p.test, p.heads)
    report = loop.compare(TinyNet(), p.base, p.merged, p.finetuned, p.val, grid=(1.0,), verbose=False,
                          routed={"r1": p.updates(1), "r4": p.updates(4)})
    assert report.rows["r4"].scores == report.rows["finetuned"].scores
    kept = report.retained_mean("r1")
    assert kept < 0.9 and kept == pytest.approx(report.rows["r1"].mean["accuracy"])
    table = report.to_table().splitlines()
    assert table[0].split() == ["accuracy", "pretrained", "finetuned", "tsv_m", "tsv_m/ft", "r1", "r1/retained", "r4",
                                "r4/retained"]
    mean = table[3].split()
    assert mean[0] == "mean" and float(mean[6]) == pytest.approx(kept, abs=1e-4) and mean[8] == "1.0000"
    assert table[4].split() == ["scaling", "1.0000"]  # no lam for routed rows
    report.to_csv(tmp_path / "r.csv")
    rows = list(csv.DictReader(open(tmp_path / "r.csv")))
    r1 = next(r for r in rows if r["model"] == "r1" and r["task"] == "mean")
    assert float(r1["retained"]) == pytest.approx(kept) and r1["normalized"] == r1["scaling"] == ""
    merged = next(r for r in rows if r["model"] == "tsv_m" and r["task"] == "mean")
    assert merged["retained"] == "" and float(merged["normalized"]) == pytest.approx(report.normalized_mean("tsv_m"))
    report.to_json(tmp_path / "r.json")
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["routed"] == ["r1", "r4"] and data["retained"]["r4"] == {"a": 1.0, "b": 1.0}
    assert set(data["normalized"]) == {"tsv_m"} and data["rows"]["r1"]["mean"]["accuracy"] == pytest.approx(kept)
    pytest.importorskip("matplotlib")
    report.plot(tmp_path / "r.png")
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


def test_routed_rows_are_checked_before_any_work():
    p = Problem()
    merge = Merged(p)
    untouched = MergedEvalLoop({t: Untouchable() for t in TASKS}, p.heads)
    with pytest.raises(ValueError, match=r"row names of `compressed` .* but got 'tsv_m'"):
        untouched.compare_callback(TinyNet(), merge, ["tsv_m"], compressed={"tsv_m": TSVC(rank=1)})
    with pytest.raises(ValueError, match=r"argument `compressed\['x'\]` to hold TSV-C options .* but got 'rnak'"):
        untouched.compare_callback(TinyNet(), merge, ["tsv_m"], compressed={"x": {"rnak": 1}})
    with pytest.raises(TypeError, match="Expected argument `compressed` to be a TSVC or a non-empty mapping"):
        untouched.compare_callback(TinyNet(), merge, ["tsv_m"], compressed=0.1)
    assert merge.calls == 0
    with pytest.raises(ValueError, match=r"`routed\['r'\]` to hold an update for every task, but task 'b' has none"):
        untouched.compare(TinyNet(), p.base, p.merged, p.finetuned, routed={"r": {"a": p.updates(1)["a"]}})
    with pytest.raises(ValueError, match=r"keys of `routed\['r'\]\['a'\]` to be keys of `base`.*'head.weight'"):
        untouched.compare(TinyNet(), p.base, routed={"r": {t: {"head.weight": torch.zeros(3, 5)} for t in TASKS}})
    with pytest.raises(ValueError, match=r"other rows \['pretrained', 'finetuned', 'tsv_m'\], but got 'finetuned'"):
        untouched.compare(TinyNet(), p.base, p.merged, routed={"finetuned": p.updates(1)})
    wrong = {t: {"body.weight": torch.zeros(4, 5)} for t in TASKS}
    with pytest.raises(ValueError, match=r"`updates\['a'\]\['body.weight'\]` to have the shape of `base"):
        MergedEvalLoop(p.test, p.heads).run_routed(TinyNet(), p.base, wrong)
    with pytest.raises(ValueError, match="Expected argument `routed` to name rows other than"):
        MergeReport("accuracy", {"finetuned": EvalResult({"a": {"accuracy": 1.0}})}, routed=["finetuned"])
    report = MergeReport("accuracy", {"finetuned": EvalResult({"a": {"accuracy": 1.0}}),
                                      "m": EvalResult({"a": {"accuracy": 0.5}})})
    with pytest.raises(ValueError, match=r"Expected a task-routed row \[\], but got 'm'. HINT"):
        report.retained("m")


def test_run_routed_leaves_the_model_at_base_with_its_own_head():
    p = Problem()
    model = TinyNet()
    head = {k: v.clone() for k, v in model.head.state_dict().items()}
    result = MergedEvalLoop(p.test, p.heads).run_routed(model, p.base, p.updates(4))
    assert all(result.scores[t]["accuracy"] == 1.0 for t in TASKS)
    assert all(torch.equal(model.state_dict()[k], p.base[k]) for k in BODY)
    assert all(torch.equal(head[k], v) for k, v in model.head.state_dict().items())


def test_a_merge_callback_run_scores_its_compressed_folders_like_the_in_memory_rows(tmp_path):
    torch.manual_seed(0)
    pretrained = {k: v for k, v in TrainableNet().state_dict().items() if k in BODY}
    merge = MergeCallback("tsv_m", tasks=["two", "three"], exclude=["head.*"], dirpath=tmp_path / "m", progress=False,
                          compress={"rank": 1})
    gen, test = torch.Generator().manual_seed(1), {}
    for task, classes in zip(merge.tasks, (2, 3), strict=True):
        model = TrainableNet(classes=classes)
        model.load_state_dict(pretrained, strict=False)
        teacher = TinyNet(classes=classes)
        train, test[task] = class_loader(teacher, 32, gen), class_loader(teacher, 40, gen)
        pl.Trainer(max_epochs=3, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                   callbacks=[merge]).fit(model, train)
    loop = MergedEvalLoop.from_callback(merge, test)
    report = loop.compare_callback(model, merge, ["tsv_m"], grid=(1.0,), progress=False, verbose=False,
                                   compressed=merge.compress)
    assert list(report.rows) == ["pretrained", "finetuned", "tsv_m", "tsv_c"]
    base = {k: merge.base_source.get_tensor(k) for k in merge.plan.merge_keys}
    files = {t: load_compressed(folder) for t, folder in merge.compressed.items()}
    from_files = loop.run_routed(model, base, files)
    assert from_files.scores == report.rows["tsv_c"].scores
    for task, source in merge.task_sources.items():  # the folders hold the float64 truncations of the fine-tunes
        d = source.get_tensor("body.weight") - base["body.weight"]
        assert torch.allclose(files[task]["body.weight"], truncation(d, 1), atol=1e-5)
