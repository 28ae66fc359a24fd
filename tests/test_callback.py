from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.strategies import FSDPStrategy
from safetensors.torch import load_file, save_file
from xxhash import xxh3_128_hexdigest

from lightning_merge import TSVM, get_method
from lightning_merge.callbacks import MergeCallback
from lightning_merge.callbacks.merge import _check_strategy
from lightning_merge.io import MergeRecord
from tests._callback_helpers import (
    TASKS,
    CrashAtEpoch,
    DumpWeights,
    pretrained_state,
    task_loader,
    task_module,
    trainer,
)

EXCLUDE = ["head.*"]


def fine_tune_all(tmp_path, merge, extra=(), **trainer_kwargs):
    """Workflow 1: one fit per task, each from the pre-trained weights; returns the modules after their fits."""
    base = pretrained_state()
    modules = []
    for i, _ in enumerate(TASKS):
        module = task_module(base)
        trainer(tmp_path, [merge, *extra], **trainer_kwargs).fit(module, task_loader(i))
        modules.append(module)
    return base, modules


def expected_merge(method, base, finetuned_states):
    """An independent single-process merge: the method applied key by key to in-memory tensors."""
    return {k: method(base[k], [s[k] for s in finetuned_states]) for k in base if not k.startswith("head.")}


def test_workflow_1_merges_when_the_last_task_ends(tmp_path):
    merge = MergeCallback("tsv_m", {"rank": 2}, tasks=TASKS, exclude=EXCLUDE, dirpath=tmp_path / "m", progress=False)
    snapshots = []

    class Keep(Callback):  # the task weights before the merge touches them, taken at each fit's train end
        def on_train_end(self, trainer, pl_module):
            snapshots.append({k: v.clone() for k, v in pl_module.state_dict().items()})

    base, modules = fine_tune_all(tmp_path, merge, extra=[Keep()])
    assert merge.collected == list(TASKS)
    expected = expected_merge(TSVM(rank=2), base, snapshots)
    merged = modules[-1].state_dict()
    for key, value in expected.items():
        assert torch.allclose(merged[key], value, rtol=1e-6, atol=1e-7), key
    assert torch.equal(merged["head.weight"], snapshots[-1]["head.weight"])  # the module keeps its own head
    for task, snap in zip(TASKS, snapshots, strict=True):
        assert torch.equal(merge.heads[task]["head.weight"], snap["head.weight"])
    saved = load_file(tmp_path / "m" / "merged" / "model.safetensors")
    assert set(saved) == set(base) and torch.equal(saved["body.0.weight"], merged["body.0.weight"])
    assert torch.equal(saved["head.weight"], base["head.weight"])  # excluded keys come from the base
    assert (tmp_path / "m" / "merged" / "heads" / "beta.safetensors").is_file()
    assert (tmp_path / "m" / "merged" / "merge_record.json").is_file()
    assert merge.merge_seconds is not None and merge.merge_seconds > 0
    assert_record(tmp_path / "m" / "merged", "tsv_m", list(TASKS), world_size=1)
    record = MergeRecord.load(tmp_path / "m" / "merged")
    assert record.options["rank"] == 2 and sorted(record.excluded_keys) == ["head.bias", "head.weight"]
    snapshots_on_disk = [tmp_path / "m" / d / "model.safetensors" for d in ["base", *(
        f"task-{i:02d}-{t}" for i, t in enumerate(TASKS))]]
    assert [Path(f["path"]) for i in record.inputs for f in i["files"]] == snapshots_on_disk
    assert not [p for p in (tmp_path / "m").iterdir() if p.name.startswith(".")]  # no temporary folder left


def assert_record(folder, method, tasks, world_size):
    """The callback's merge record, checked against the files and the run: what was merged, from which files."""
    record = MergeRecord.load(folder)
    assert record.method == method and record.tasks == tasks and record.world_size == world_size
    assert record.exclude == EXCLUDE and not set(record.merged_keys) & set(record.excluded_keys)
    assert set(record.merged_keys) == set(load_file(folder / "model.safetensors")) - {"head.weight", "head.bias"}
    written = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert sorted(record.outputs) == written
    assert [i["role"] for i in record.inputs] == ["base"] + ["finetuned"] * len(tasks)
    for file in (f for i in record.inputs for f in i["files"]):
        path = Path(file["path"])
        assert file["hash"] == "xxh3_128:" + xxh3_128_hexdigest(path.read_bytes())
        assert file["bytes"] == path.stat().st_size
    return record


def test_workflow_1_ddp_spawn_two_ranks_agree_with_a_single_process_merge(tmp_path):
    dump = tmp_path / "dump"
    dump.mkdir()
    merge = MergeCallback("sftm", tasks=TASKS, exclude=EXCLUDE, dirpath=tmp_path / "m", progress=False)
    fine_tune_all(tmp_path, merge, extra=[DumpWeights(dump)], devices=2, strategy="ddp_spawn")
    rank0, rank1 = torch.load(dump / "rank0.pt"), torch.load(dump / "rank1.pt")
    assert_record(tmp_path / "m" / "merged", "sftm", list(TASKS), world_size=2)
    base = load_file(tmp_path / "m" / "base" / "model.safetensors")
    tasks = [load_file(tmp_path / "m" / f"task-{i:02d}-{t}" / "model.safetensors") for i, t in enumerate(TASKS)]
    expected = expected_merge(get_method("sftm"), base, tasks)
    for key, value in expected.items():
        assert torch.equal(rank0[key], rank1[key]), key
        assert torch.allclose(rank0[key], value, rtol=1e-6, atol=1e-7), key


def test_workflow_2_merges_checkpoints_trained_elsewhere(tmp_path):
    base = pretrained_state()
    save_file(base, tmp_path / "base.safetensors")
    states, checkpoints = [], {}
    for i, task in enumerate(TASKS):
        ckpt = ModelCheckpoint(dirpath=tmp_path / task)
        module = task_module(base)
        trainer(tmp_path, [ckpt], enable_checkpointing=True).fit(module, task_loader(i))
        states.append({k: v.clone() for k, v in module.state_dict().items()})
        checkpoints[task] = ckpt if i == 0 else ckpt.best_model_path  # a ModelCheckpoint or a path
    merge = MergeCallback("ties", {"density": 0.5}, base=tmp_path / "base.safetensors", finetuned=checkpoints,
                          exclude=EXCLUDE, dirpath=tmp_path / "m", progress=False)
    target = task_module(base)
    trainer(tmp_path, [merge], max_epochs=1, limit_train_batches=1).fit(target, task_loader(0))
    expected = expected_merge(get_method("ties", density=0.5), base, states)
    for key, value in expected.items():
        assert torch.allclose(target.state_dict()[key], value, rtol=1e-6, atol=1e-7), key
    assert set(merge.heads) == set(TASKS)
    assert (tmp_path / "m" / "merged" / "model.safetensors").is_file()
    record = assert_record(tmp_path / "m" / "merged", "ties", list(TASKS), world_size=1)
    given = [tmp_path / "base.safetensors", *(Path(c.best_model_path if i == 0 else c)
                                              for i, c in enumerate(checkpoints.values()))]
    assert [Path(f["path"]) for i in record.inputs for f in i["files"]] == given


def test_crash_mid_sequence_then_resume_gives_the_uninterrupted_merge(tmp_path):
    reference = MergeCallback("tsv_m", tasks=TASKS, exclude=EXCLUDE, dirpath=tmp_path / "ref", progress=False)
    _, modules = fine_tune_all(tmp_path / "ref_root", reference, max_epochs=3)
    expected = modules[-1].state_dict()

    base = pretrained_state()
    ckdir = tmp_path / "ckpt"
    first = MergeCallback("tsv_m", tasks=TASKS, exclude=EXCLUDE, dirpath=tmp_path / "m", progress=False)
    trainer(tmp_path, [first], max_epochs=3).fit(task_module(base), task_loader(0))
    with pytest.raises(RuntimeError, match="simulated crash"):
        ckpt = ModelCheckpoint(dirpath=ckdir, save_last=True)
        trainer(tmp_path, [first, ckpt, CrashAtEpoch(2)], max_epochs=3, enable_checkpointing=True).fit(
            task_module(base), task_loader(1))
    assert first.collected == ["alpha"]

    # a new process: a new callback
    resumed = MergeCallback("tsv_m", tasks=TASKS, exclude=EXCLUDE, dirpath=tmp_path / "m", progress=False)
    ckpt = ModelCheckpoint(dirpath=ckdir, save_last=True)
    trainer(tmp_path, [resumed, ckpt], max_epochs=3, enable_checkpointing=True).fit(
        task_module(base), task_loader(1), ckpt_path=ckdir / "last.ckpt")
    assert resumed.collected == ["alpha", "beta"]
    final = task_module(base)
    trainer(tmp_path, [resumed], max_epochs=3).fit(final, task_loader(2))
    assert resumed.collected == list(TASKS)
    for key, value in expected.items():
        if not key.startswith("head."):
            assert torch.allclose(final.state_dict()[key], value, rtol=1e-6, atol=1e-7), key


def test_warns_when_a_task_does_not_start_from_the_pretrained_weights(tmp_path):
    merge = MergeCallback("average", tasks=TASKS[:2], exclude=EXCLUDE, dirpath=tmp_path / "m", progress=False)
    module = task_module(pretrained_state())
    trainer(tmp_path, [merge]).fit(module, task_loader(0))
    with pytest.warns(UserWarning, match="does not start from the pre-trained weights"):
        trainer(tmp_path, [merge]).fit(module, task_loader(1))  # continues from task 0's fine-tune


def test_resume_with_other_tasks_is_refused():
    merge = MergeCallback(tasks=["a", "b"])
    with pytest.raises(ValueError, match=r"tasks to be \['a', 'b'\].*HINT"):
        merge.load_state_dict({"run_id": "x", "tasks": ["a", "c"], "collected": ["a"]})


def test_state_dict_holds_primitives_and_round_trips():
    merge = MergeCallback(tasks=["a", "b"])
    state = merge.state_dict()
    assert state["collected"] == [] and state["tasks"] == ["a", "b"] and isinstance(state["run_id"], str)
    other = MergeCallback(tasks=["a", "b"])
    other.load_state_dict({**state, "collected": ["a"]})
    assert other.collected == ["a"]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({}, ValueError, "exactly one of the arguments `tasks`"),
        ({"tasks": ["a"], "finetuned": {"a": "x"}, "base": "b"}, ValueError, "exactly one"),
        ({"tasks": ["a", "a"]}, ValueError, "distinct task names"),
        ({"tasks": "ab"}, ValueError, "`tasks`"),
        ({"finetuned": {"a": "x"}}, ValueError, "together with `base`"),
        ({"tasks": ["a"], "exclude": "head.*"}, TypeError, "`exclude`"),
        ({"tasks": ["a"], "method": "tsvm"}, ValueError, "`method`"),
        ({"tasks": ["a"], "method_options": {"rank": 0}}, ValueError, "`rank`"),
    ],
)
def test_constructor_validates_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        MergeCallback(**kwargs)


def test_sharded_strategies_are_refused():
    with pytest.raises(ValueError, match="sharded strategy FSDPStrategy.*HINT"):
        _check_strategy(FSDPStrategy())
