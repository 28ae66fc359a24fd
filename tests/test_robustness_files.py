"""Untrusted and broken files, bad output paths and a full disk (issue #8).

Every case must end in a clear error that names the file, with no partial output (no output folder, no temporary
folder) and the inputs unchanged (sha256 of every input file before and after).
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import struct

import pytest
import torch
from safetensors.torch import save_file

from lightning_merge.callbacks import MergeCallback
from lightning_merge.cli import main
from lightning_merge.engine import merge_checkpoints
from lightning_merge.io import open_source, save_state_dict
from lightning_merge.io import writer as writer_module
from tests._callback_helpers import TASKS, pretrained_state, task_loader, task_module, trainer
from tests._robustness_helpers import FullDisk, ShellPayload, TouchPayload, sha256_tree

PAYLOADS = [TouchPayload, ShellPayload]


def merge_into(out, folder, *finetuned, **kwargs):
    finetuned = finetuned or (folder / "t0.safetensors", folder / "t1.safetensors")
    return merge_checkpoints("tsv_m", folder / "base.safetensors", list(finetuned), out, progress=False, **kwargs)


def assert_no_output(out):
    """No output folder, and no hidden sibling of it (a temporary folder, or an old output moved aside)."""
    assert not out.exists()
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def run_cli(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("lightning-merge: error: ") and err.count("\n") == 1 and "Traceback" not in err
    return err


# ------------------------------------------------------------------------------- broken safetensors
def _truncate_data(data: bytes) -> bytes:
    return data[: len(data) - 100]


def _truncate_header(data: bytes) -> bytes:
    return data[:12]


def _garble_header(data: bytes) -> bytes:
    return data[:8] + b"{" + b"\x00" * 20 + data[29:]


def _huge_header_length(data: bytes) -> bytes:
    return struct.pack("<Q", 2**40) + data[8:]


def _offsets_past_the_end(data: bytes) -> bytes:
    header = json.dumps({"w": {"dtype": "F32", "shape": [16, 8], "data_offsets": [0, 4096]}}).encode()
    return struct.pack("<Q", len(header)) + header + b"\x00" * 512


def _unknown_dtype(data: bytes) -> bytes:
    header = json.dumps({"w": {"dtype": "X99", "shape": [2], "data_offsets": [0, 8]}}).encode()
    return struct.pack("<Q", len(header)) + header + b"\x00" * 8


def _empty_file(data: bytes) -> bytes:
    return b""


CORRUPTIONS = [_truncate_data, _truncate_header, _garble_header, _huge_header_length, _offsets_past_the_end,
               _unknown_dtype, _empty_file]


@pytest.mark.parametrize("corrupt", CORRUPTIONS, ids=lambda f: f.__name__.strip("_"))
def test_truncated_or_corrupted_safetensors_is_refused_naming_the_file(tmp_path, inputs, corrupt):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(corrupt((inputs / "t1.safetensors").read_bytes()))
    with pytest.raises(ValueError, match=r"'.*bad\.safetensors'"):
        merge_into(tmp_path / "out", inputs, inputs / "t0.safetensors", bad)
    assert_no_output(tmp_path / "out")


def test_corrupted_tensor_bytes_decoding_to_nan_are_refused_naming_the_key(tmp_path, inputs):
    """Bytes flipped inside the data (the header still valid) decode as NaN: the merge refuses them."""
    data = bytearray((inputs / "t1.safetensors").read_bytes())
    data[-64:] = b"\xff" * 64  # 0xffffffff is a float32 NaN
    (tmp_path / "bad.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"Could not merge key '\w+': Expected finite task vectors, but "
                                         r"`task_vectors\[1\]`.*fine-tuned checkpoint t of \[.*bad\.safetensors"):
        merge_into(tmp_path / "out", inputs, inputs / "t0.safetensors", tmp_path / "bad.safetensors")
    assert_no_output(tmp_path / "out")


# ------------------------------------------------------------------------------------ malicious pickle
def write_malicious(path, payload_cls, marker, legacy=False):
    state = {"state_dict": {"w": torch.zeros(16, 8), "b": torch.zeros(16)}, "payload": payload_cls(marker)}
    if legacy:
        with open(path, "wb") as f:
            pickle.dump(state, f)
    else:
        torch.save(state, path)


@pytest.mark.parametrize("payload", PAYLOADS, ids=lambda c: c.__name__)
def test_the_payload_is_live_when_loaded_unsafely(tmp_path, payload):
    """Control: the same file loaded without ``weights_only`` does run the payload (so the refusals below mean
    something)."""
    write_malicious(tmp_path / "control.ckpt", payload, tmp_path / "ran")
    torch.load(tmp_path / "control.ckpt", weights_only=False)
    assert (tmp_path / "ran").exists()


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-pickle"])
@pytest.mark.parametrize("payload", PAYLOADS, ids=lambda c: c.__name__)
def test_malicious_ckpt_is_refused_without_running_it(tmp_path, inputs, payload, legacy):
    evil, marker = tmp_path / "evil.ckpt", tmp_path / "pwned"
    write_malicious(evil, payload, marker, legacy)
    with pytest.raises(ValueError, match=r"Refusing to load '.*evil\.ckpt'.*It was not executed"):
        open_source(evil)
    with pytest.raises(ValueError, match=r"Refusing to load '.*evil\.ckpt'"):
        merge_into(tmp_path / "out", inputs, inputs / "t0.safetensors", evil)
    assert_no_output(tmp_path / "out")
    assert not marker.exists()


@pytest.mark.parametrize("payload", PAYLOADS, ids=lambda c: c.__name__)
def test_malicious_ckpt_is_refused_by_the_command_line(tmp_path, inputs, payload, capsys):
    evil, marker = tmp_path / "evil.ckpt", tmp_path / "pwned"
    write_malicious(evil, payload, marker)
    argv = ["--base", str(inputs / "base.safetensors"), "--finetuned", str(inputs / "t0.safetensors"), str(evil),
            "--method", "tsv_m", "--output", str(tmp_path / "out"), "--quiet"]
    err = run_cli(argv, capsys)
    assert "Refusing to load" in err and "evil.ckpt" in err and "It was not executed" in err
    assert_no_output(tmp_path / "out")
    assert not marker.exists()


@pytest.mark.parametrize("role", ["base", "finetuned"])
def test_malicious_ckpt_is_refused_by_the_callback(tmp_path, role):
    """MergeCallback workflow 2 with the base or a fine-tuned checkpoint given as the malicious file."""
    base = pretrained_state()
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(base, str(tmp_path / "tuned.safetensors"))
    marker = tmp_path / "pwned"
    write_malicious(tmp_path / "evil.ckpt", ShellPayload, marker)
    paths = {"base": tmp_path / "base.safetensors", "finetuned": tmp_path / "tuned.safetensors",
             role: tmp_path / "evil.ckpt"}
    merge = MergeCallback("tsv_m", base=paths["base"], finetuned={"alpha": paths["finetuned"]},
                          exclude=["head.*"], dirpath=tmp_path / "m", progress=False)
    module = task_module(base)
    with pytest.raises(ValueError, match=r"Refusing to load '.*evil\.ckpt'.*It was not executed"):
        trainer(tmp_path, [merge], max_epochs=1, limit_train_batches=1).fit(module, task_loader(0))
    assert not marker.exists()
    assert not (tmp_path / "m" / "merged").exists()


# ------------------------------------------------------------------------------------- model folders
def sharded_folder(tmp_path, name="hf"):
    folder = tmp_path / name
    folder.mkdir()
    save_state_dict(pretrained_state(), folder, max_shard_size=600)
    assert (folder / "model.safetensors.index.json").is_file()
    return folder


def test_folder_with_a_missing_shard_is_refused_naming_it(tmp_path, capsys):
    folder = sharded_folder(tmp_path)
    save_file(pretrained_state(), str(tmp_path / "base.safetensors"))
    (folder / "model-00002-of-00003.safetensors").unlink()
    before = sha256_tree(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"names files that do not exist: \['model-00002-of-00003"):
        merge_checkpoints("average", tmp_path / "base.safetensors", [folder], tmp_path / "out", progress=False)
    argv = ["--base", str(tmp_path / "base.safetensors"), "--finetuned", str(folder), "--method", "average",
            "--output", str(tmp_path / "out"), "--quiet"]
    assert "model-00002-of-00003.safetensors" in run_cli(argv, capsys)
    assert_no_output(tmp_path / "out")
    assert sha256_tree(tmp_path) == before


def test_folder_whose_index_points_to_the_wrong_shard_is_refused(tmp_path):
    folder = sharded_folder(tmp_path)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    key = next(iter(index["weight_map"]))
    index["weight_map"][key] = "model-00003-of-00003.safetensors"  # a shard that does not hold the key
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    save_file(pretrained_state(), str(tmp_path / "base.safetensors"))
    with pytest.raises(KeyError, match=rf"Key '{key}' is not in checkpoint '.*model-00003-of-00003"):
        merge_checkpoints("average", tmp_path / "base.safetensors", [folder], tmp_path / "out", progress=False)
    assert_no_output(tmp_path / "out")


def test_folder_with_a_corrupt_index_is_refused(tmp_path):
    folder = sharded_folder(tmp_path)
    (folder / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"Could not read the shard index '.*model\.safetensors\.index\.json'"):
        open_source(folder)


# --------------------------------------------------------------------------------- another architecture
def test_checkpoint_of_another_architecture_is_refused_with_a_hint(tmp_path, inputs):
    save_file({"encoder.w": torch.zeros(16, 8), "encoder.b": torch.zeros(16)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match=r"missing in the fine-tuned checkpoint '.*other\.safetensors' \(2 of 2.*"
                                         r"HINT: the key names differ throughout"):
        merge_into(tmp_path / "out", inputs, inputs / "t0.safetensors", tmp_path / "other.safetensors")
    save_file({"w": torch.zeros(32, 8), "b": torch.zeros(16)}, str(tmp_path / "wider.safetensors"))
    with pytest.raises(ValueError, match=r"Key 'w' has shape \(16, 8\) in the base .* but \(32, 8\) in the"
                                         r" fine-tuned checkpoint '.*wider\.safetensors'"):
        merge_into(tmp_path / "out", inputs, inputs / "t0.safetensors", tmp_path / "wider.safetensors")
    assert_no_output(tmp_path / "out")


# ----------------------------------------------------------------------------------------- the output
def test_existing_output_is_refused_and_left_intact(tmp_path, inputs):
    out = tmp_path / "out"
    merge_into(out, inputs)
    before = sha256_tree(out)
    with pytest.raises(FileExistsError, match=r"'.*out' already exists. HINT: pass overwrite=True"):
        merge_into(out, inputs)
    assert sha256_tree(out) == before


def test_output_under_a_regular_file_is_an_os_error_naming_it(tmp_path, inputs, capsys):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(OSError, match=r"'.*file'"):
        merge_into(tmp_path / "file" / "out", inputs)
    argv = ["--base", str(inputs / "base.safetensors"), "--finetuned", str(inputs / "t0.safetensors"),
            "--method", "average", "--output", str(tmp_path / "file" / "out"), "--quiet"]
    assert "file" in run_cli(argv, capsys)
    assert (tmp_path / "file").read_text() == "not a folder"


def test_read_only_output_folder_is_an_os_error(tmp_path, inputs):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        (parent / "probe").mkdir()
    except PermissionError:
        pass
    else:  # root (as in CI containers) ignores permission bits; the case under a file above still runs
        (parent / "probe").rmdir()
        pytest.skip("running as root: a read-only folder is still writable, so no error can be provoked")
    with pytest.raises(PermissionError, match=r"'.*ro"):
        merge_into(parent / "out", inputs)
    assert list(parent.iterdir()) == []


# --------------------------------------------------------------------------------------- a full disk
@pytest.mark.parametrize("budget", [0, 100, 700], ids=["at-the-header", "mid-tensor", "mid-shard"])
@pytest.mark.parametrize("overwrite", [False, True], ids=["new", "overwrite"])
def test_full_disk_leaves_no_partial_output_and_keeps_the_old_one(tmp_path, inputs, monkeypatch, budget, overwrite):
    out = tmp_path / "out"
    if overwrite:
        merge_into(out, inputs, max_shard_size=256)
    before = sha256_tree(out) if overwrite else None
    disk = FullDisk(budget)
    monkeypatch.setattr(writer_module, "open", disk, raising=False)
    with pytest.raises(OSError, match="No space left on device") as err:
        merge_into(out, inputs, overwrite=overwrite, max_shard_size=256)
    assert err.value.errno == errno.ENOSPC and disk.failures == 1
    assert not list(tmp_path.glob(".out.*"))  # no temporary folder, no old output moved aside
    if overwrite:
        assert sha256_tree(out) == before  # the previous output survives, byte for byte
    else:
        assert not out.exists()


def test_full_disk_through_the_command_line(tmp_path, inputs, monkeypatch, capsys):
    monkeypatch.setattr(writer_module, "open", FullDisk(300), raising=False)
    argv = ["--base", str(inputs / "base.safetensors"), "--finetuned", str(inputs / "t0.safetensors"),
            str(inputs / "t1.safetensors"), "--method", "sftm", "--output", str(tmp_path / "out"), "--quiet"]
    assert "No space left on device" in run_cli(argv, capsys)
    assert_no_output(tmp_path / "out")


def test_full_disk_while_recording_a_task_keeps_the_earlier_snapshots(tmp_path, monkeypatch):
    """Workflow 1: the disk fills while task 1's weights are recorded: the fit fails with the OS error, the
    snapshots already taken are intact, no temporary folder is left and task 1 is not counted as recorded."""
    merge = MergeCallback("tsv_m", tasks=TASKS, exclude=["head.*"], dirpath=tmp_path / "m", progress=False)
    base = pretrained_state()
    trainer(tmp_path, [merge], max_epochs=1).fit(task_module(base), task_loader(0))
    before = sha256_tree(tmp_path / "m")
    monkeypatch.setattr(writer_module, "open", FullDisk(500), raising=False)
    with pytest.raises(OSError, match="No space left on device"):
        trainer(tmp_path, [merge], max_epochs=1).fit(task_module(base), task_loader(1))
    assert merge.collected == ["alpha"]
    assert sha256_tree(tmp_path / "m") == before  # base, task-00 and the manifest: unchanged, nothing added
    assert not [p for p in os.listdir(tmp_path / "m") if p.startswith(".")]  # no temporary folder left
