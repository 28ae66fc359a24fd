"""The merge plan, key sharding, the streaming merge and merge_checkpoints (bitwise against the in-memory core)."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from xxhash import xxh3_128_hexdigest

import lightning_merge
from lightning_merge import engine
from lightning_merge import functional as F
from lightning_merge.engine import MergePlan, merge_checkpoints, merge_keys, plan_merge, shard_keys, task_matrices
from lightning_merge.io import MergeRecord, hashing, open_source
from lightning_merge.methods import METHODS, TaskArithmetic, get_method

T = 3


def make_state(seed: int, head_classes: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "blocks.0.attn.weight": torch.randn(12, 8, generator=g),
        "blocks.0.attn.bias": torch.randn(12, generator=g),
        "blocks.0.mlp.weight": torch.randn(8, 12, generator=g),
        "norm.weight": torch.randn(8, generator=g),
        "patch.weight": torch.randn(4, 2, 2, 2, generator=g),
        "position_ids": torch.arange(5),
        "head.weight": torch.randn(head_classes, 8, generator=g),
    }


def finetune(base: dict[str, torch.Tensor], seed: int, head_classes: int = 3) -> dict[str, torch.Tensor]:
    other = make_state(seed, head_classes)
    return {k: base[k] + 0.1 * v if v.is_floating_point() and v.shape == base[k].shape else v for k, v in other.items()}


@pytest.fixture
def models() -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    base = make_state(0)
    return base, [finetune(base, t + 1) for t in range(T)]


@pytest.fixture
def on_disk(tmp_path, models) -> tuple[Path, list[Path]]:
    """The base as safetensors, the fine-tunes as a Lightning-style .ckpt, a torch file and a HF folder."""
    base, tuned = models
    save_file(base, str(tmp_path / "base.safetensors"))
    torch.save({"state_dict": tuned[0], "epoch": 1}, tmp_path / "t0.ckpt")
    torch.save(tuned[1], tmp_path / "t1.pt")
    (tmp_path / "t2").mkdir()
    save_file(tuned[2], str(tmp_path / "t2" / "model.safetensors"))
    return tmp_path / "base.safetensors", [tmp_path / "t0.ckpt", tmp_path / "t1.pt", tmp_path / "t2"]


def reference(method, base, tuned, keys) -> dict[str, torch.Tensor]:
    return {k: method(base[k], [t[k] for t in tuned]) if base[k].is_floating_point() else base[k] for k in keys}


def file_digests(paths: list[Path]) -> dict[Path, str]:
    files = [f for p in paths for f in (sorted(p.iterdir()) if p.is_dir() else [p])]
    return {f: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


# ----------------------------------------------------------------------------------------------- the plan


def test_plan_classifies_keys(models):
    base, tuned = models
    plan = plan_merge(open_source(base), [open_source(t) for t in tuned], exclude=["head.*"])
    assert plan.matrix_keys == ("blocks.0.attn.weight", "blocks.0.mlp.weight")
    assert plan.other_keys == ("blocks.0.attn.bias", "norm.weight", "patch.weight")
    assert plan.merge_keys == plan.matrix_keys + plan.other_keys
    assert plan.excluded_keys == ("head.weight",)
    assert plan.skipped == {"position_ids": "non-floating-point buffer (torch.int64), copied from the base"}
    assert list(plan.shapes) == list(base) and plan.shapes["patch.weight"] == (4, 2, 2, 2)


def test_plan_exclude_regex_and_bad_patterns(models):
    base, tuned = models
    sources = [open_source(t) for t in tuned]
    plan = plan_merge(open_source(base), sources, exclude=[r"re:(head|norm)\..*"])
    assert plan.excluded_keys == ("norm.weight", "head.weight")
    with pytest.raises(ValueError, match=r"valid regexes after 're:', but got 're:\('"):
        plan_merge(open_source(base), sources, exclude=["re:("])
    with pytest.raises(TypeError, match="Expected argument `exclude` to be a sequence of str patterns"):
        plan_merge(open_source(base), sources, exclude="head.*")


def test_plan_warns_on_unused_exclude(models, caplog):
    base, tuned = models
    plan_merge(open_source(base), [open_source(t) for t in tuned], exclude=["classifier.*"])
    assert "Exclude pattern 'classifier.*' matches no key" in caplog.text


def test_plan_missing_key_names_key_file_and_hint(models):
    base, tuned = models
    del tuned[1]["norm.weight"]
    sources = [open_source(t, label=f"ft{i}.ckpt") for i, t in enumerate(tuned)]
    msg = (r"Key 'norm.weight' of the base 'base' is missing in the fine-tuned checkpoint 'ft1.ckpt' \(1 of 6"
           r".*HINT: exclude")
    with pytest.raises(ValueError, match=msg):
        plan_merge(open_source(base, label="base"), sources)
    plan = plan_merge(open_source(base, label="base"), sources, strict=False)
    assert plan.skipped["norm.weight"] == "missing in 'ft1.ckpt', copied from the base"
    assert "norm.weight" not in plan.merge_keys


def test_plan_shape_mismatch_names_both_shapes(models):
    base, _ = models
    tuned = [finetune(base, 1), finetune(base, 2, head_classes=5)]
    sources = [open_source(t, label=f"ft{i}") for i, t in enumerate(tuned)]
    msg = (r"Key 'head.weight' has shape \(3, 8\) in the base 'base' but \(5, 8\) in the fine-tuned checkpoint 'ft1'\."
           r" HINT: .*exclude=\['head\.\*'\]")
    with pytest.raises(ValueError, match=msg):
        plan_merge(open_source(base, label="base"), sources)
    assert plan_merge(open_source(base), sources, exclude=["head.*"]).excluded_keys == ("head.weight",)
    plan = plan_merge(open_source(base), sources, strict=False)
    assert plan.skipped["head.weight"].startswith("shape (5, 8) in 'ft1' != (3, 8) in the base")


def test_plan_extra_key_and_wrong_prefix(models):
    base, tuned = models
    tuned[0]["adapter.weight"] = torch.zeros(2)
    with pytest.raises(ValueError, match=r"Key 'adapter.weight' of the fine-tuned checkpoint 'ft' is not in the base"):
        plan_merge(open_source(base), [open_source(tuned[0], label="ft")])
    assert "adapter.weight" in plan_merge(open_source(base), [open_source(tuned[0])], strict=False).skipped
    prefixed = open_source(tuned[1], add_prefix="model.", label="ft")
    msg = r"\(6 of 6 base parameters are missing there\)\. HINT: .*prefix='model\.'.* \(\d+ more"
    with pytest.raises(ValueError, match=msg):
        plan_merge(open_source(base), [prefixed])


def test_plan_argument_errors(models):
    base, _ = models
    with pytest.raises(ValueError, match="Expected argument `finetuned` to hold at least one checkpoint"):
        plan_merge(open_source(base), [])
    with pytest.raises(TypeError, match=r"Expected argument `finetuned\[0\]` to be a CheckpointSource, but got dict"):
        plan_merge(open_source(base), [base])


# -------------------------------------------------------------------------------------------- sharding


def test_shard_keys_partitions_balanced_and_deterministic():
    shapes = {f"w{i}": (8 * (i % 5 + 1), 16) for i in range(20)} | {f"b{i}": (16,) for i in range(5)}
    plan = MergePlan(tuple(k for k in shapes if k[0] == "w"), tuple(k for k in shapes if k[0] == "b"), (), {}, shapes)
    method = get_method("tsv_m")
    shards = shard_keys(plan, method, num_tasks=4, world_size=3)
    assert shards == shard_keys(plan, method, num_tasks=4, world_size=3)
    assert sorted(k for s in shards for k in s) == sorted(plan.merge_keys)
    order = list(plan.merge_keys)
    assert all(s == sorted(s, key=order.index) for s in shards)
    loads = [sum(method.cost(shapes[k], 4) for k in s) for s in shards]
    biggest = max(method.cost(s, 4) for s in shapes.values())
    assert max(loads) - min(loads) <= biggest
    assert shard_keys(plan, method, 4, 1) == [list(plan.merge_keys)]
    assert len(shard_keys(plan, method, 4, 40)) == 40
    with pytest.raises(ValueError, match="Expected argument `world_size` to be a positive int, but got 0"):
        shard_keys(plan, method, 4, 0)


# ------------------------------------------------------------------------------------------- streaming


@pytest.mark.parametrize("name", sorted(METHODS))
def test_merge_keys_is_bitwise_the_core(models, name):
    base, tuned = models
    method = get_method(name)
    keys = list(base)
    merged = dict(merge_keys(method, open_source(base), [open_source(t) for t in tuned], keys))
    expected = reference(method, base, tuned, keys)
    assert list(merged) == keys
    for key in keys:
        assert merged[key].dtype == base[key].dtype and torch.equal(merged[key], expected[key]), key


def test_merge_keys_dtype_and_half_precision(models):
    base, tuned = models
    method = get_method("tsv_m", rank=2)
    keys = ["blocks.0.attn.weight", "norm.weight", "position_ids"]
    half = {k: v.bfloat16() if v.is_floating_point() else v for k, v in base.items()}
    half_tuned = [{k: v.bfloat16() if v.is_floating_point() else v for k, v in t.items()} for t in tuned]
    out = dict(merge_keys(method, open_source(half), [open_source(t) for t in half_tuned], keys))
    assert out["blocks.0.attn.weight"].dtype == torch.bfloat16
    assert torch.equal(out["norm.weight"], reference(method, half, half_tuned, ["norm.weight"])["norm.weight"])
    wide = dict(merge_keys(method, open_source(half), [open_source(t) for t in half_tuned], keys, dtype="float32"))
    assert wide["blocks.0.attn.weight"].dtype == torch.float32 and wide["position_ids"].dtype == torch.int64
    expected = method(half["blocks.0.attn.weight"].float(), [t["blocks.0.attn.weight"] for t in half_tuned])
    assert torch.equal(wide["blocks.0.attn.weight"], expected)


def test_merge_keys_argument_errors(models):
    base, tuned = models
    sources = [open_source(t) for t in tuned]
    with pytest.raises(ValueError, match="Expected argument `device` to be a torch device.*'gpu0'"):
        merge_keys(get_method("average"), open_source(base), sources, ["norm.weight"], device="gpu0")
    with pytest.raises(ValueError, match="Expected argument `dtype` to be None or a floating-point dtype"):
        merge_keys(get_method("average"), open_source(base), sources, ["norm.weight"], dtype=torch.int8)
    with pytest.raises(TypeError, match="Expected argument `method` to be a MergeMethod, but got str"):
        merge_keys("average", open_source(base), sources, ["norm.weight"])
    with pytest.raises(KeyError, match="'nope' is not in checkpoint"):
        list(merge_keys(get_method("average"), open_source(base), sources, ["nope"]))


def test_progress_bar_and_silence(models, capsys):
    base, tuned = models
    args = (get_method("average"), open_source(base), [open_source(t) for t in tuned], list(base))
    list(merge_keys(*args, progress=False))
    assert capsys.readouterr().err == ""
    list(merge_keys(*args, progress=True))
    assert "merging (average)" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_merge_keys_on_cuda(models):
    base, tuned = models
    method = get_method("tsv_m", solver="exact")
    out = dict(merge_keys(method, open_source(base), [open_source(t) for t in tuned], list(base), device="cuda"))
    for key, expected in reference(method, base, tuned, list(base)).items():
        assert out[key].device.type == "cpu"
        torch.testing.assert_close(out[key], expected, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------- to disk


@pytest.mark.parametrize("name", ["tsv_m", "ties"])
def test_merge_checkpoints_bitwise_and_record(tmp_path, models, on_disk, name):
    base, tuned = models
    base_path, tuned_paths = on_disk
    before = file_digests([base_path, *tuned_paths])
    method = get_method(name)
    record = merge_checkpoints(method, base_path, tuned_paths, tmp_path / "out", exclude=["head.*"], progress=False)
    merged = open_source(tmp_path / "out")
    expected = reference(method, base, tuned, [k for k in base if k != "head.weight"])
    assert sorted(merged.keys()) == sorted(base)
    for key in base:
        want = base[key] if key == "head.weight" else expected[key]
        assert merged.dtype(key) == base[key].dtype and torch.equal(merged.get_tensor(key), want), key
    assert file_digests([base_path, *tuned_paths]) == before
    saved = json.loads((tmp_path / "out" / "merge_record.json").read_text())
    assert saved == json.loads(json.dumps(record.to_dict()))
    assert saved["method"] == name and saved["options"] == json.loads(json.dumps(method.options()))
    assert saved["scaling"] == method.scaling and saved["version"] == lightning_merge.__version__
    assert saved["excluded_keys"] == ["head.weight"] and "position_ids" in saved["skipped"]
    assert saved["outputs"] == ["model.safetensors", "merge_record.json"]
    files = {Path(f["path"]): f for i in saved["inputs"] for f in i["files"]}
    expected_hashes = {p: "xxh3_128:" + xxh3_128_hexdigest(p.read_bytes()) for p in before}
    assert {p: f["hash"] for p, f in files.items()} == expected_hashes
    assert all(f["bytes"] == p.stat().st_size for p, f in files.items())
    assert [i["role"] for i in saved["inputs"]] == ["base"] + ["finetuned"] * T
    assert saved["schema_version"] == 1 and saved["tasks"] == [] and saved["world_size"] == 1
    assert MergeRecord.load(tmp_path / "out") == record
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_merge_checkpoints_shards_prefix_dtype_and_state_dicts(tmp_path, models):
    base, tuned = models
    ckpts = []
    for i, t in enumerate(tuned):
        torch.save({"state_dict": {f"model.{k}": v for k, v in t.items()}}, tmp_path / f"t{i}.ckpt")
        ckpts.append(tmp_path / f"t{i}.ckpt")
    record = merge_checkpoints("average", base, ckpts, tmp_path / "out", prefix="model.", base_prefix="",
                               dtype="float64", max_shard_size=300, progress=False, input_hash=None)
    assert "model.safetensors.index.json" in record.outputs and record.dtype == "float64"
    merged = open_source(tmp_path / "out")
    expected = reference(get_method("average"), base, tuned, list(base))
    assert merged.dtype("norm.weight") == torch.float64 and merged.dtype("position_ids") == torch.int64
    torch.testing.assert_close(merged.get_tensor("norm.weight"), expected["norm.weight"].double())
    assert record.inputs[0]["files"] == [] and record.inputs[1]["files"][0]["hash"] is None


def test_merge_checkpoints_non_strict_copies_from_base(tmp_path, models):
    base, tuned = models
    tuned[0]["head.weight"] = torch.zeros(7, 8)
    record = merge_checkpoints("task_arithmetic", base, tuned, tmp_path / "out", strict=False, progress=False)
    assert "head.weight" in record.skipped and "head.weight" not in record.merged_keys
    assert torch.equal(open_source(tmp_path / "out").get_tensor("head.weight"), base["head.weight"])


def test_unknown_input_hash_is_refused_before_any_work(tmp_path, models):
    base, tuned = models
    msg = r"Expected argument `input_hash` to be one of \['xxh3_128', 'sha256', None\], but got 'md5'"
    with pytest.raises(ValueError, match=msg):
        merge_checkpoints("average", base, tuned, tmp_path / "out", progress=False, input_hash="md5")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_refused_unless_overwrite(tmp_path, models):
    base, tuned = models
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"'.*out' already exists\. HINT: pass overwrite=True"):
        merge_checkpoints("average", base, tuned, tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    with pytest.raises(ValueError, match=r"'.*out' holds no merge_record.json; overwrite=True replaces only"):
        merge_checkpoints("average", base, tuned, tmp_path / "out", overwrite=True, progress=False)
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"  # a folder of the user's files is never replaced
    (tmp_path / "out" / "keep.txt").unlink()
    merge_checkpoints("average", base, tuned, tmp_path / "out", overwrite=True, progress=False)  # empty: replaced
    merge_checkpoints("average", base, tuned, tmp_path / "out", overwrite=True, progress=False)  # its own output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["merge_record.json", "model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_output_inside_inputs_or_a_file_name_is_refused(tmp_path, on_disk):
    base_path, tuned_paths = on_disk
    with pytest.raises(ValueError, match=r"to be outside the inputs, but '.*t2' holds the input"):
        merge_checkpoints("average", base_path, tuned_paths, tuned_paths[2], overwrite=True, progress=False)
    with pytest.raises(ValueError, match=r"to be outside the inputs, but '.*t2/merged' lies inside the input '.*t2'"):
        merge_checkpoints("average", base_path, tuned_paths, tuned_paths[2] / "merged", progress=False)
    assert sorted(p.name for p in tuned_paths[2].iterdir()) == ["model.safetensors"]
    with pytest.raises(ValueError, match=r"to be outside the inputs, but '.*' holds the input '.*base\.safetensors'"):
        merge_checkpoints("average", base_path, tuned_paths, tmp_path, overwrite=True, progress=False)
    prefixed = open_source(tuned_paths[2], add_prefix="model.")  # a source wrapping a folder: the folder is an input
    with pytest.raises(ValueError, match=r"'.*t2/sub' lies inside the input '.*t2'"):
        merge_checkpoints("average", prefixed, [prefixed], tuned_paths[2] / "sub", progress=False)
    with pytest.raises(ValueError, match=r"to be a folder path, but got the file name '.*merged\.safetensors'"):
        merge_checkpoints("average", base_path, tuned_paths, tmp_path / "merged.safetensors", progress=False)
    with pytest.raises(TypeError, match="wrap a single checkpoint in a list"):
        merge_checkpoints("average", base_path, tuned_paths[0], tmp_path / "out", progress=False)
    with pytest.raises(FileNotFoundError, match="not found"):
        merge_checkpoints("average", base_path, [tmp_path / "nope.ckpt"], tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
@pytest.mark.parametrize("existing", [False, True])
def test_interrupted_merge_leaves_nothing(tmp_path, monkeypatch, on_disk, error, existing):
    base_path, tuned_paths = on_disk
    before = file_digests([base_path, *tuned_paths])
    if existing:  # a previous merge: the only kind of folder overwrite=True replaces
        merge_checkpoints("average", base_path, tuned_paths, tmp_path / "out", progress=False)
    previous = file_digests(sorted((tmp_path / "out").iterdir())) if existing else None
    calls = []
    merge = TaskArithmetic.__call__

    def failing(self, base, finetuned):
        calls.append(1)
        if len(calls) == 3:
            raise error("interrupted")
        return merge(self, base, finetuned)

    monkeypatch.setattr(TaskArithmetic, "__call__", failing)
    with pytest.raises(error, match="interrupted"):
        merge_checkpoints("task_arithmetic", base_path, tuned_paths, tmp_path / "out", overwrite=True, progress=False)
    assert len(calls) == 3
    assert file_digests([base_path, *tuned_paths]) == before
    if existing:
        assert file_digests(sorted((tmp_path / "out").iterdir())) == previous
    else:
        assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    assert _threads_gone("lightning-merge-hash"), "the hash thread kept running after the merge failed"


def _threads_gone(prefix: str, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not [t for t in threading.enumerate() if t.name.startswith(prefix)]:
            return True
        time.sleep(0.01)
    return False


def _hash_files_in_background(paths, followed):
    marks = hashing.ReadMarks()
    pool = ThreadPoolExecutor(max_workers=1)
    # small steps, so that a mark in the middle of a file is honoured within a few bytes
    future = pool.submit(hashing._hash_trailing, paths, "xxh3_128", marks, followed, 7)
    pool.shutdown(wait=False)
    return marks, future


def test_hashing_trails_the_merge_and_matches_a_one_shot_hash(tmp_path):
    paths = []
    for i, size in enumerate([1000, 0, 333]):
        paths.append(tmp_path / f"f{i}.safetensors")
        paths[-1].write_bytes(os.urandom(size))
    paths.append(tmp_path / "other.ckpt")  # not followed: hashed at once
    paths[-1].write_bytes(os.urandom(500))
    want = {p: "xxh3_128:" + xxh3_128_hexdigest(p.read_bytes()) for p in paths}
    marks, future = _hash_files_in_background(paths, set(paths[:3]))
    marks.advance(paths[0], 600)
    marks.advance(paths[0], 200)  # marks never move back (keys read out of file order)
    time.sleep(0.3)
    assert not future.done(), "hashed past the merge's marks"
    for end in (10, 700, 1000):
        marks.advance(paths[0], end)
    marks.advance(paths[2], 333)
    assert future.result(timeout=10) == want  # every followed file reached its end: no close needed
    marks, future = _hash_files_in_background(paths, set(paths[:3]))
    marks.advance(paths[2], 100)
    marks.close()  # the merge is done: the rest is hashed at once
    assert future.result(timeout=10) == want


def test_hashing_stops_when_the_merge_fails(tmp_path):
    (tmp_path / "a.safetensors").write_bytes(os.urandom(100))
    marks, future = _hash_files_in_background([tmp_path / "a.safetensors"], {tmp_path / "a.safetensors"})
    marks.advance(tmp_path / "a.safetensors", 50)
    marks.close(abort=True)
    with pytest.raises(RuntimeError, match="hashing stopped: the merge failed"):
        future.result(timeout=10)


def test_merged_folder_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=32, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=16, max_position_embeddings=16)
    torch.manual_seed(0)
    base = transformers.BertModel(config)
    base.save_pretrained(tmp_path / "base")
    tuned = []
    for t in range(2):
        model = transformers.BertModel(config)
        model.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        model.save_pretrained(tmp_path / f"t{t}")
        tuned.append(tmp_path / f"t{t}")
    merge_checkpoints("tsv_m", tmp_path / "base", tuned, tmp_path / "out", progress=False)
    config.save_pretrained(tmp_path / "out")
    merged = transformers.BertModel.from_pretrained(tmp_path / "out")
    source = open_source(tmp_path / "out")
    for key in source.keys():
        assert torch.equal(merged.state_dict()[key], source.get_tensor(key)), key


def test_engine_imports_without_lightning():
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['lightning'] = sys.modules['pytorch_lightning'] = None\n"
        "import lightning_merge.engine, lightning_merge.io, lightning_merge.cli"
    )
    result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert engine.RECORD_FILE == "merge_record.json"


@pytest.mark.parametrize("name", ["task_arithmetic", "tsv_m", "sftm"])
def test_task_matrices_give_m_once_for_every_scaling(name):
    g = torch.Generator().manual_seed(7)
    base = {"w": torch.randn(12, 10, generator=g), "b": torch.randn(10, generator=g)}
    tuned = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(3)]
    method = get_method(name, scaling=0.4)
    sources = [open_source(t, label=f"t{i}") for i, t in enumerate(tuned)]
    m = dict(task_matrices(method, open_source(base), sources, ["w", "b"]))
    for key in base:  # M from the functional core on the differences, and W0 + lam * M as the method merges at lam
        expected = getattr(F, name)([t[key] - base[key] for t in tuned], scaling=1.0)
        assert torch.allclose(m[key], expected, atol=1e-6)
        assert torch.allclose(base[key] + 0.4 * m[key], method(base[key], [t[key] for t in tuned]), atol=1e-6)


def test_placed_writes_in_any_order_give_the_streamed_files_byte_for_byte(tmp_path):
    """ShardLayout + write_placed (what each rank of a many-process merge does), keys written in reverse order and
    in two separate calls (two ranks): the same files as write_stream, byte for byte (index included)."""
    from lightning_merge.io.writer import ShardLayout, specs_of, write_placed, write_stream

    g = torch.Generator().manual_seed(3)
    state = {f"k{i}": torch.randn(5 + i, 3, generator=g).to(torch.bfloat16 if i % 2 else torch.float32)
             for i in range(7)} | {"ids": torch.arange(4), "empty": torch.zeros(0)}
    (tmp_path / "stream").mkdir()
    (tmp_path / "placed").mkdir()
    streamed = write_stream(tmp_path / "stream", specs_of(state), state.items(), max_shard_size=100)
    layout = ShardLayout(specs_of(state), max_shard_size=100)
    assert layout.create(tmp_path / "placed") == streamed == layout.files
    items = list(state.items())[::-1]
    write_placed(tmp_path / "placed", layout, items[::2])
    write_placed(tmp_path / "placed", layout, items[1::2])
    assert len(streamed) > 2
    for name in streamed:
        assert (tmp_path / "placed" / name).read_bytes() == (tmp_path / "stream" / name).read_bytes(), name
    with pytest.raises(ValueError, match="Expected key 'k0' to be a tensor of shape"):
        write_placed(tmp_path / "placed", layout, [("k0", torch.zeros(2))])
    with pytest.raises(ValueError, match="Expected a key of the output layout"):
        write_placed(tmp_path / "placed", layout, [("nope", torch.zeros(2))])


def test_balance_splits_every_index_once_within_four_thirds_of_the_best_split():
    """Against the best split found by brute force: every index in exactly one share, each share in index order,
    the largest load at most 4/3 of the optimum (Graham's bound for longest-processing-time-first)."""
    import itertools

    from lightning_merge.engine.shard import balance

    g = torch.Generator().manual_seed(5)
    for trial in range(20):
        n, ranks = 3 + trial % 6, 2 + trial % 2
        costs = [float(c) for c in torch.randint(1, 50, (n,), generator=g)]
        shares = balance(costs, ranks)
        assert sorted(i for share in shares for i in share) == list(range(n))
        assert all(share == sorted(share) for share in shares)
        best = min(max(sum(c for c, r in zip(costs, who, strict=True) if r == k) for k in range(ranks))
                   for who in itertools.product(range(ranks), repeat=n))
        assert max(sum(costs[i] for i in share) for share in shares) <= 4 / 3 * best + 1e-9
    assert balance([], 3) == [[], [], []]
