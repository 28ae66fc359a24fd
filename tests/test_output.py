"""Output folders (io.output: atomic publishing, stale temporaries, checks against the inputs) and the merge record
(io.record: one schema, round trip, load errors naming the file)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import save_file

from lightning_merge.engine import merge_checkpoints
from lightning_merge.io import RECORD_FILE, MergeRecord, check_output, describe_input, publish_folder
from lightning_merge.io import output as output_module
from lightning_merge.io.output import stale_temporaries


def tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): p.read_text() for p in sorted(folder.rglob("*")) if p.is_file()}


def siblings(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir())


@pytest.fixture
def old(tmp_path) -> Path:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    (out / "sub").mkdir()
    (out / "sub" / "deep.txt").write_text("deep")
    return out


# ------------------------------------------------------------------------------------------------ publish_folder
def test_publish_replaces_the_folder_only_at_the_end(old):
    with publish_folder(old) as tmp:
        assert tmp.parent == old.parent and tmp.name.startswith(".out.") and tmp.is_dir() and not any(tmp.iterdir())
        (tmp / "new.txt").write_text("new")
        assert tree(old) == {"old.txt": "old", "sub/deep.txt": "deep"}  # untouched while the block runs
    assert tree(old) == {"new.txt": "new"}
    assert siblings(old) == ["out"]  # no temporary and no old folder left


def test_publish_creates_missing_parents(tmp_path):
    with publish_folder(tmp_path / "a" / "b" / "out") as tmp:
        (tmp / "x").write_text("x")
    assert tree(tmp_path) == {"a/b/out/x": "x"}


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
@pytest.mark.parametrize("existing", [True, False])
def test_an_error_inside_the_block_leaves_the_old_folder_and_no_temporary(tmp_path, old, error, existing):
    out = old if existing else tmp_path / "new"
    with pytest.raises(error, match="stop"), publish_folder(out) as tmp:
        (tmp / "half.txt").write_text("half")
        raise error("stop")
    if existing:
        assert tree(out) == {"old.txt": "old", "sub/deep.txt": "deep"}
    else:
        assert not out.exists()
    assert siblings(old) == ["out"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_failed_swap_puts_the_old_folder_back(old, monkeypatch):
    real = os.replace
    calls = []

    def failing(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if len(calls) == 2:  # the first moves the old folder aside, the second would move the new one in
            raise OSError("disk gone")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError, match="disk gone"), publish_folder(old) as tmp:
        (tmp / "new.txt").write_text("new")
    assert tree(old) == {"old.txt": "old", "sub/deep.txt": "deep"} and siblings(old) == ["out"]


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid  # exited and reaped: no process has this id now (ids are not reused this quickly)


def test_stale_temporaries_of_dead_processes_are_removed_others_kept(tmp_path):
    out, dead, live, host = tmp_path / "out", _dead_pid(), os.getppid(), output_module._host()
    names = {
        f".out.lightning-merge-tmp-{host}-{dead}-0123abcd": "removed",  # a dead writer's temporary
        f".out.lightning-merge-old-{host}-{dead}-89abcdef": "removed",  # a dead writer's old output moved aside
        f".out.lightning-merge-tmp-{host}-{live}-0123abcd": "kept",  # a live writer's
        f".out.lightning-merge-tmp-otherhost{host}-{dead}-0123abcd": "kept",  # another host's: cannot tell
        f".other.lightning-merge-tmp-{host}-{dead}-0123abcd": "kept",  # another output's
        f".out.lightning-merge-tmp-{host}-{dead}-xyz": "kept",  # not this library's pattern
        ".out.tmp-0123abcd": "kept",
        "out.lightning-merge-tmp-1-0123abcd": "kept",
    }
    for name in names:
        (tmp_path / name).mkdir()
        (tmp_path / name / "f").write_text(name)
    stale = sorted(n for n, fate in names.items() if fate == "removed")
    assert [p.name for p in stale_temporaries(out)] == stale
    with publish_folder(out) as tmp:
        (tmp / "x").write_text("x")
    kept = sorted(n for n, fate in names.items() if fate == "kept")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", *kept])
    assert all((tmp_path / n / "f").read_text() == n for n in kept)


def test_an_old_output_moved_aside_by_a_killed_writer_is_put_back(tmp_path):
    """A writer killed between moving the old output aside and moving the new one in: the next writer restores the
    old output before anything else (it is the only copy), then replaces it as asked."""
    out, dead, host = tmp_path / "out", _dead_pid(), output_module._host()
    old = tmp_path / f".out.lightning-merge-old-{host}-{dead}-0123abcd"
    old.mkdir()
    (old / "w").write_text("previous")
    with publish_folder(out) as tmp:
        assert (out / "w").read_text() == "previous"  # restored before the new output is published
        (tmp / "w").write_text("new")
    assert tree(out) == {"w": "new"} and siblings(out) == ["out"]


def test_temporaries_name_this_process(tmp_path):
    with publish_folder(tmp_path / "out") as tmp:
        assert f"-{output_module._host()}-{os.getpid()}-" in tmp.name
        assert stale_temporaries(tmp_path / "out") == []  # this process is alive: its temporary is not stale


# -------------------------------------------------------------------------------------------------- check_output
@pytest.fixture
def inputs(tmp_path) -> dict[str, Path]:
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "model.safetensors").write_bytes(b"weights")
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "base_model").write_bytes(b"base")  # a torch file needs no extension
    return {"folder": tmp_path / "hf", "file": tmp_path / "in" / "base_model"}


@pytest.mark.parametrize(
    ("output", "relation"),
    [
        ("in/base_model", "holds"),  # the input file itself
        ("in", "holds"),  # a folder holding an input file
        (".", "holds"),
        ("hf", "holds"),  # the input folder itself
        ("hf/merged", "lies inside"),  # inside an input folder
        ("hf/a/b", "lies inside"),
    ],
)
def test_check_output_refuses_the_inputs(tmp_path, inputs, output, relation):
    with pytest.raises(ValueError, match=rf"Expected argument `out` to be outside the inputs, but .* {relation} the"):
        check_output(tmp_path / output, overwrite=True, inputs=inputs.values(), argument="out")


def test_check_output_follows_symlinks_to_inputs(tmp_path, inputs):
    (tmp_path / "link").symlink_to(inputs["folder"])
    with pytest.raises(ValueError, match="holds the input"):
        check_output(tmp_path / "link", overwrite=True, inputs=[inputs["folder"]])
    with pytest.raises(ValueError, match="lies inside the input"):
        check_output(tmp_path / "link" / "out", overwrite=True, inputs=[inputs["folder"]])


@pytest.mark.parametrize("name", ["merged.safetensors", "model.ckpt", "w.bin", "w.pt", "w.pth"])
def test_check_output_refuses_a_weights_file_name(tmp_path, name):
    with pytest.raises(ValueError, match=rf"Expected argument `output` to be a folder path, but got the file name"
                                         rf" '.*{name}'"):
        check_output(tmp_path / name, overwrite=False)


def test_check_output_refuses_an_existing_path_without_overwrite(tmp_path, inputs):
    (tmp_path / "out").mkdir()
    (tmp_path / "file").write_text("x")
    for path in (tmp_path / "out", tmp_path / "file"):
        with pytest.raises(FileExistsError, match=rf"'{re.escape(str(path))}' already exists\. HINT: pass overwrite"):
            check_output(path, overwrite=False, inputs=inputs.values())
    assert check_output(tmp_path / "out", overwrite=True, inputs=inputs.values()) == tmp_path / "out"  # empty
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"'.*out' holds no merge_record.json; overwrite=True replaces only"):
        check_output(tmp_path / "out", overwrite=True, inputs=inputs.values())
    with pytest.raises(ValueError, match=r"'.*file' is a file; overwrite=True replaces only"):
        check_output(tmp_path / "file", overwrite=True, inputs=inputs.values())
    assert check_output("relative", overwrite=False) == Path.cwd() / "relative"


@pytest.mark.parametrize("output", [None, 3, ""])
def test_check_output_refuses_a_non_path(output):
    with pytest.raises(TypeError, match="Expected argument `output` to be a folder path"):
        check_output(output, overwrite=False)


# ------------------------------------------------------------------------------------------------- the record
def a_record(**changes) -> MergeRecord:
    fields = dict(method="tsv_m", options={"rank": 0.5}, scaling=1.0, inputs=[], outputs=["model.safetensors"],
                  merged_keys=["w"], skipped={"step": "non-floating-point"}, tasks=["a", "b"], world_size=2)
    return MergeRecord(**{**fields, **changes})


def test_record_round_trips_through_its_file(tmp_path):
    (tmp_path / "w.bin").write_bytes(b"12345")
    entry = describe_input("base", "the base", 3, [tmp_path / "w.bin"], {tmp_path / "w.bin": "xxh3_128:00"})
    assert entry == {"role": "base", "name": "the base", "keys": 3,
                     "files": [{"path": str(tmp_path / "w.bin"), "bytes": 5, "hash": "xxh3_128:00"}]}
    record = a_record(inputs=[entry])
    path = record.save(tmp_path)
    assert path == tmp_path / RECORD_FILE
    assert MergeRecord.load(tmp_path) == record and MergeRecord.load(path) == record
    saved = json.loads(path.read_text())
    assert saved["schema_version"] == 1 and saved["tasks"] == ["a", "b"] and saved["world_size"] == 2


def test_record_reads_an_older_file_without_the_optional_fields(tmp_path):
    required = {"method": "average", "options": {}, "scaling": 1.0, "inputs": [], "outputs": [], "merged_keys": []}
    (tmp_path / RECORD_FILE).write_text(json.dumps(required))
    record = MergeRecord.load(tmp_path)
    assert record.method == "average" and record.tasks == [] and record.world_size == 1 and record.schema_version == 1


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("[1, 2]", r"to hold a JSON object, but got list"),
        ("{not json", r"to hold a JSON merge record, but it does not parse"),
        ('{"method": "average"}', r"to hold the merge record fields \['options', 'scaling', 'inputs'"),
        (json.dumps({**a_record().to_dict(), "schema_version": 2}), r"`schema_version` in .* to be an int in \[1, 1\]"
                                                                    r", but got 2\. HINT: a newer"),
        (json.dumps({**a_record().to_dict(), "schema_version": "1"}), r"`schema_version`.*but got '1'"),
    ],
)
def test_record_load_errors_name_the_file(tmp_path, content, match):
    (tmp_path / RECORD_FILE).write_text(content)
    with pytest.raises(ValueError, match=match) as err:
        MergeRecord.load(tmp_path)
    assert str(tmp_path / RECORD_FILE) in str(err.value)


def test_record_of_a_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        MergeRecord.load(tmp_path)


def test_the_engine_and_the_callback_write_the_same_schema(tmp_path):
    """Both records load with MergeRecord.load and hold the same fields (the callback's is written by a fit)."""
    pytest.importorskip("lightning")
    from lightning_merge.callbacks import MergeCallback
    from tests._callback_helpers import TASKS, pretrained_state, task_loader, task_module, trainer

    base = pretrained_state()
    save_file(base, str(tmp_path / "base.safetensors"))
    tuned = {t: tmp_path / f"{t}.safetensors" for t in TASKS[:2]}
    for i, path in enumerate(tuned.values()):
        save_file({k: v + 0.01 * (i + 1) for k, v in base.items()}, str(path))
    merge_checkpoints("average", tmp_path / "base.safetensors", list(tuned.values()), tmp_path / "engine",
                      exclude=["head.*"], progress=False)
    merge = MergeCallback("average", base=tmp_path / "base.safetensors", finetuned=tuned, exclude=["head.*"],
                          dirpath=tmp_path / "m", progress=False)
    trainer(tmp_path, [merge], max_epochs=1, limit_train_batches=1).fit(task_module(base), task_loader(0))
    engine = json.loads((tmp_path / "engine" / RECORD_FILE).read_text())
    callback = json.loads((tmp_path / "m" / "merged" / RECORD_FILE).read_text())
    assert sorted(engine) == sorted(callback)
    records = [MergeRecord.load(tmp_path / "engine"), MergeRecord.load(tmp_path / "m" / "merged")]
    for record in records:
        assert record.method == "average" and sorted(record.excluded_keys) == ["head.bias", "head.weight"]
        assert [Path(f["path"]).name for i in record.inputs for f in i["files"]] == [
            "base.safetensors", "alpha.safetensors", "beta.safetensors"]
        assert len({f["hash"] for i in record.inputs for f in i["files"]}) == 3  # three different files
    assert records[0].inputs == records[1].inputs  # the same files, sizes and hashes, described alike
    assert records[0].merged_keys == records[1].merged_keys and records[0].outputs[0] == records[1].outputs[0]
    assert records[1].tasks == list(TASKS[:2]) and records[0].tasks == []
