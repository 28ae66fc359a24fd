"""MergeCallback workflow 1 across processes (one job per task), which task a fit is, and the heads per task."""

import logging
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from safetensors.torch import load_file

from lightning_merge import TSVM, get_method
from lightning_merge.callbacks import MergeCallback
from lightning_merge.engine import task_matrices
from lightning_merge.io import MergeRecord
from tests._callback_helpers import TASKS, IndexedData, TaskModule, pretrained_state, task_loader, task_module, trainer

EXCLUDE = ["head.*"]
ORDER = ("gamma", "alpha", "beta")  # not the declared order


def new_callback(tmp_path, **kwargs):
    """A new MergeCallback on the same dirpath, as a new process (one job per task) would build it."""
    return MergeCallback("tsv_m", {"rank": 2}, tasks=TASKS, exclude=EXCLUDE, dirpath=tmp_path / "m", progress=False,
                         **kwargs)


class TaskData(pl.LightningDataModule):
    def __init__(self, task: str):
        super().__init__()
        self.merge_task = task

    def train_dataloader(self):
        return task_loader(TASKS.index(self.merge_task))


def reference(tmp_path, tasks=TASKS):
    """One process, one callback, the tasks in declared order: the merged module and each task's fine-tune."""
    merge = MergeCallback("tsv_m", {"rank": 2}, tasks=tasks, exclude=EXCLUDE, dirpath=tmp_path / "ref", progress=False)
    snapshots = {}

    class Keep(Callback):
        def on_train_end(self, trainer, pl_module):
            snapshots[tasks[len(snapshots)]] = {k: v.clone() for k, v in pl_module.state_dict().items()}

    module = None
    for task in tasks:
        module = task_module(pretrained_state())
        trainer(tmp_path / "ref_root", [merge, Keep()]).fit(module, task_loader(TASKS.index(task)))
    return module, snapshots


def fit_job(tmp_path, task, how, monkeypatch):
    """One job: a new callback and a new module from the pre-trained weights; the task named the way ``how`` says."""
    merge = new_callback(tmp_path, task=task) if how == "argument" else new_callback(tmp_path)
    module = task_module(pretrained_state())
    if how == "attribute":
        merge.task = task
    if how == "module":
        module.merge_task = task
    monkeypatch.delenv("LIGHTNING_MERGE_TASK", raising=False)
    if how == "env":
        monkeypatch.setenv("LIGHTNING_MERGE_TASK", task)
    data = TaskData(task) if how == "datamodule" else None
    fit = trainer(tmp_path, [merge])
    fit.fit(module, datamodule=data) if data else fit.fit(module, task_loader(TASKS.index(task)))
    return merge, module


@pytest.mark.parametrize("how", ["argument", "attribute", "env", "datamodule", "module"])
def test_one_job_per_task_in_any_order_merges_when_the_last_task_is_recorded(tmp_path, how, monkeypatch):
    expected, _ = reference(tmp_path)
    merge, module = fit_job(tmp_path, ORDER[0], how, monkeypatch)
    base_bytes = (tmp_path / "m" / "base" / "model.safetensors").read_bytes()
    merge, module = fit_job(tmp_path, ORDER[1], how, monkeypatch)
    assert merge.collected == ["alpha", "gamma"] and not (tmp_path / "m" / "merged").exists()
    merge, module = fit_job(tmp_path, ORDER[2], how, monkeypatch)
    assert merge.collected == list(TASKS) and merge.missing == []
    assert (tmp_path / "m" / "base" / "model.safetensors").read_bytes() == base_bytes  # snapshotted once
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [
        "base", "manifest.json", "merged", "task-00-alpha", "task-01-beta", "task-02-gamma"]
    for key, value in expected.state_dict().items():
        if not key.startswith("head."):
            assert torch.allclose(module.state_dict()[key], value, rtol=1e-6, atol=1e-7), key
    assert MergeRecord.load(tmp_path / "m" / "merged").tasks == list(TASKS)
    assert set(merge.heads) == set(TASKS)


def test_an_unknown_task_is_refused_before_training(tmp_path, monkeypatch):
    started = []

    class Started(Callback):
        def on_train_start(self, trainer, pl_module):
            started.append(True)

    with pytest.raises(ValueError, match=r"`task` to be None or one of the tasks \['alpha', 'beta', 'gamma'\]"):
        new_callback(tmp_path, task="delta")
    monkeypatch.setenv("LIGHTNING_MERGE_TASK", "delta")
    merge = new_callback(tmp_path)
    match = r"LIGHTNING_MERGE_TASK\) to be one of the declared tasks \['alpha', 'beta', 'gamma'\], but got 'delta'"
    with pytest.raises(ValueError, match=match):
        trainer(tmp_path, [merge, Started()]).fit(task_module(pretrained_state()), task_loader(0))
    assert not started and merge.collected == []


def test_a_recorded_task_is_refused_unless_overwrite(tmp_path):
    trainer(tmp_path, [new_callback(tmp_path, task="beta")]).fit(task_module(pretrained_state()), task_loader(1))
    again = new_callback(tmp_path, task="beta")
    with pytest.raises(ValueError, match=r"'beta' is already recorded \(recorded: \['beta'\]; declared: .*overwrite"):
        trainer(tmp_path, [again]).fit(task_module(pretrained_state()), task_loader(1))
    again = new_callback(tmp_path, task="beta", overwrite=True)
    trainer(tmp_path, [again]).fit(task_module(pretrained_state()), task_loader(1))
    assert again.collected == ["beta"]


def test_fewer_fits_than_tasks_log_what_is_missing_and_merge_collected_merges_the_recorded(tmp_path, caplog):
    _, snapshots = reference(tmp_path, tasks=("alpha", "beta"))
    merge = new_callback(tmp_path)
    with caplog.at_level(logging.INFO):
        for i, _ in enumerate(TASKS[:2]):
            trainer(tmp_path, [merge]).fit(task_module(pretrained_state()), task_loader(i))
    assert "tasks ['gamma'] are not recorded yet" in caplog.text and "merge_collected(module)" in caplog.text
    assert not (tmp_path / "m" / "merged").exists()

    later = new_callback(tmp_path)  # another process
    target = task_module(pretrained_state())
    later.merge_collected(target)
    base = pretrained_state()
    for key in base:
        if not key.startswith("head."):
            value = TSVM(rank=2)(base[key], [snapshots[t][key] for t in ("alpha", "beta")])
            assert torch.allclose(target.state_dict()[key], value, rtol=1e-6, atol=1e-7), key
    assert MergeRecord.load(tmp_path / "m" / "merged").tasks == ["alpha", "beta"]
    assert set(later.heads) == {"alpha", "beta"} and later.missing == ["gamma"]


def test_a_new_process_resuming_must_name_its_task_and_warns_when_it_starts_elsewhere(tmp_path):
    trainer(tmp_path, [new_callback(tmp_path)]).fit(task_module(pretrained_state()), task_loader(0))
    module = task_module({k: v + 0.01 for k, v in pretrained_state().items()})
    # e.g. the loop over the tasks re-run after an interruption: its first fit is alpha's data, not beta's
    with pytest.raises(ValueError, match=r"name its task when it resumes.*recorded: \['alpha'\].*\('beta'\).*HINT"):
        trainer(tmp_path, [unnamed := new_callback(tmp_path)]).fit(module, task_loader(1))
    assert unnamed.collected == ["alpha"] and not (tmp_path / "m" / "task-01-beta").exists()
    with pytest.warns(UserWarning) as record:
        trainer(tmp_path, [resumed := new_callback(tmp_path, task="beta")]).fit(module, task_loader(1))
    messages = [str(w.message) for w in record]
    assert any("task 'beta' does not start from the pre-trained weights" in m for m in messages)
    assert resumed.collected == ["alpha", "beta"]


def test_a_finished_run_is_replaced_and_an_unfinished_run_of_other_tasks_refused(tmp_path):
    for _ in range(2):  # e.g. running a script twice: the second run is a new one, and merges too
        merge = new_callback(tmp_path)
        for i, _ in enumerate(TASKS):
            trainer(tmp_path, [merge]).fit(task_module(pretrained_state()), task_loader(i))
        assert merge.collected == list(TASKS) and merge.merge_seconds is not None
    other = MergeCallback(tasks=["x", "y"], dirpath=tmp_path / "other", progress=False)
    trainer(tmp_path, [other]).fit(task_module(pretrained_state()), task_loader(0))
    with pytest.raises(ValueError, match=r"unfinished run of the tasks \['x', 'y'\].*HINT"):
        trainer(tmp_path, [MergeCallback(tasks=["x", "z"], dirpath=tmp_path / "other")]).fit(
            task_module(pretrained_state()), task_loader(0))


@pytest.mark.parametrize(
    ("tasks", "match"),
    [
        (["a", ""], "distinct task names"),
        (["a", 1], "distinct task names"),
        (["a\0b"], "distinct task names"),
        (["a b", "a_b"], "'a b' and 'a_b' have the same file name 'a_b'"),
        (["Task", "task"], "the same file name"),
        (["x" * 200], "too long file name"),
    ],
)
def test_task_names_are_checked_at_construction(tasks, match):
    with pytest.raises(ValueError, match=match):
        MergeCallback(tasks=tasks)


def test_task_names_become_file_names_only_through_a_safe_mapping(tmp_path):
    tasks = ["../up", "glue/sst2"]
    merge = MergeCallback("average", tasks=tasks, exclude=EXCLUDE, dirpath=tmp_path / "root" / "m", progress=False)
    for i, _ in enumerate(tasks):
        trainer(tmp_path / "root", [merge]).fit(task_module(pretrained_state()), task_loader(i))
    assert sorted(p.name for p in (tmp_path / "root").iterdir()) == ["m"]
    names = sorted(p.name for p in (tmp_path / "root" / "m").iterdir())
    assert names == ["base", "manifest.json", "merged", "task-00-_._up", "task-01-glue_sst2"]
    heads = sorted(p.name for p in (tmp_path / "root" / "m" / "merged" / "heads").iterdir())
    assert heads == ["_._up.safetensors", "glue_sst2.safetensors"] and set(merge.heads) == set(tasks)


def test_full_fine_tunes_with_a_head_shape_per_task(tmp_path):
    classes = {"two": 2, "five": 5}
    merge = MergeCallback("tsv_m", tasks=list(classes), exclude=EXCLUDE, dirpath=tmp_path / "m", progress=False)
    body = {k: v for k, v in pretrained_state().items() if not k.startswith("head.")}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i, n in enumerate(classes.values()):
            module = TaskModule(num_classes=n)
            module.load_state_dict(body, strict=False)
            trainer(tmp_path, [merge]).fit(module, task_loader(i, num_classes=n))
    assert not [w for w in caught if "does not start" in str(w.message)]
    assert merge.collected == ["two", "five"]
    for task, n in classes.items():
        assert merge.heads[task]["head.weight"].shape == (n, 12) and merge.heads[task]["head.bias"].shape == (n,)
        saved = load_file(tmp_path / "m" / "merged" / "heads" / f"{task}.safetensors")
        assert torch.equal(saved["head.weight"], merge.heads[task]["head.weight"])


def test_heads_are_validated_when_recorded(tmp_path):
    class Diverge(Callback):
        def on_train_end(self, trainer, pl_module):
            with torch.no_grad():
                pl_module.head.weight[0, 0] = float("nan")

    merge = new_callback(tmp_path)
    with pytest.raises(ValueError, match=r"'head.weight' of task 'alpha' to be finite, but it holds NaN"):
        trainer(tmp_path, [merge, Diverge()]).fit(task_module(pretrained_state()), task_loader(0))
    assert merge.collected == []
    trainer(tmp_path, [merge]).fit(task_module(pretrained_state()), task_loader(0))
    module = task_module(pretrained_state())
    module.head = torch.nn.Linear(12, 3, bias=False)
    with pytest.raises(ValueError, match=r"`exclude` of task 'beta' to be those of the recorded task 'alpha', but key"
                                         r" 'head.bias' differs"):
        trainer(tmp_path, [merge]).fit(module, task_loader(1))


def test_task_matrices_of_several_methods_from_the_merged_inputs(tmp_path):
    merge = new_callback(tmp_path)
    with pytest.raises(ValueError, match="Expected a merge to have run"):
        merge.task_matrices("tsv_m")
    for i, _ in enumerate(TASKS):
        trainer(tmp_path, [merge]).fit(task_module(pretrained_state()), task_loader(i))
    keys, tasks = list(merge.plan.merge_keys), list(merge.task_sources.values())
    got = merge.task_matrices(["tsv_m", get_method("average", scaling=0.5)], progress=False)
    named = merge.task_matrices({"ta": "task_arithmetic"}, progress=False)
    assert list(got) == ["tsv_m", "average"] and list(named) == ["ta"] and list(got["tsv_m"]) == keys
    for name, method in [("tsv_m", get_method("tsv_m")), ("average", get_method("average"))]:
        expected = dict(task_matrices(method, merge.base_source, tasks, keys))
        assert all(torch.equal(got[name][k], expected[k]) for k in keys)
    with pytest.raises(ValueError, match="`methods`"):
        merge.task_matrices(["tsv_m", "tsv_m"])


def test_state_persists_in_the_manifest(tmp_path):
    merge = new_callback(tmp_path, task="beta")
    trainer(tmp_path, [merge]).fit(task_module(pretrained_state()), task_loader(1))
    state = merge.state_dict()
    assert state["collected"] == ["beta"] and state["mode"] == "full"
    assert state["heads"] == {"beta": ["head.bias", "head.weight"]}
    assert Path(tmp_path / "m" / "manifest.json").is_file()


def test_lightning_cli_runs_one_task_per_run_from_its_config(tmp_path):
    from lightning.pytorch.cli import LightningCLI

    merges = []
    for task, index in [("beta", 1), ("alpha", 0)]:  # two separate runs, e.g. two jobs with their own --config
        cli = LightningCLI(TaskModule, IndexedData, run=False, save_config_callback=None, args=[
            "--seed_everything=0", f"--data.index={index}", "--trainer.callbacks+=lightning_merge.MergeCallback",
            "--trainer.callbacks.tasks=[alpha,beta]", f"--trainer.callbacks.task={task}",
            "--trainer.callbacks.exclude=[head.*]", f"--trainer.callbacks.dirpath={tmp_path / 'm'}",
            "--trainer.callbacks.progress=false", "--trainer.logger=false", "--trainer.max_epochs=1",
            "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path}"])
        cli.trainer.fit(cli.model, cli.datamodule)
        merges.append(next(c for c in cli.trainer.callbacks if isinstance(c, MergeCallback)))
    assert merges[0].collected == ["beta"] and merges[1].collected == ["alpha", "beta"]
    assert MergeRecord.load(tmp_path / "m" / "merged").tasks == ["alpha", "beta"]


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"run_id": 3, "tasks": [], "collected": []}',
                                  '{"run_id": "x", "tasks": ["a"], "collected": "a"}',
                                  '{"run_id": "x", "tasks": ["a"], "collected": [], "heads": {"a": "head.*"}}',
                                  "\udcff"])
def test_a_corrupt_or_foreign_manifest_is_a_clear_error(tmp_path, text):
    from lightning_merge.callbacks import _tasks

    (tmp_path / "manifest.json").write_text(text, errors="surrogateescape")
    with pytest.raises(ValueError, match=r"manifest\.json.*HINT: use another `dirpath`"):
        _tasks.read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text('{"run_id": "x", "tasks": ["a"], "collected": [], "heads": {}}')
    assert _tasks.read_manifest(tmp_path)["run_id"] == "x"
