"""Inputs that change or lie, numbers and kinds that mismatch, errors that name nothing (issue 17, classes 5, 7, 8).

Every case ends in one clear error naming the file, key or argument (one line ``lightning-merge: error: ...`` with
exit code 2 from the command), with no output written; the controls show that each crafted input is live, i.e. that
the plain library call it defeats does read it.
"""

from __future__ import annotations

import json
import os
import pickletools
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lightning_merge.cli import main
from lightning_merge.engine import merge_checkpoints, plan_merge
from lightning_merge.io import open_source

ROOT = Path(__file__).resolve().parents[1]


def cli_error(argv, capsys) -> str:
    assert main([*argv, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lightning-merge: error: ") and err.count("\n") == 1 and "Traceback" not in err
    return err


def merge_argv(base, finetuned, out, method="average"):
    return ["--base", str(base), "--finetuned", *map(str, finetuned), "--method", method, "--output", str(out)]


# ------------------------------------------------------------------------------ a file truncated during the merge
TRUNCATE_WHILE_MERGING = """
import sys, torch
from pathlib import Path
from safetensors.torch import save_file
from lightning_merge.engine import merge_checkpoints
from lightning_merge.io import open_source

folder, kind = Path(sys.argv[1]), sys.argv[2]
base = {f"w{i}": torch.randn(256, 256) for i in range(4)}
save_file(base, str(folder / "base.safetensors"))
tuned = folder / ("t.safetensors" if kind == "safetensors" else "t.ckpt")
state = {k: v + 1 for k, v in base.items()}
save_file(state, str(tuned)) if kind == "safetensors" else torch.save({"state_dict": state}, tuned)
ft = open_source(tuned)
read = ft.get_tensor


def read_then_truncate(key, device=None):  # another process truncates the fine-tune while the merge runs
    tensor = read(key, device)
    with open(tuned, "r+b") as f:
        f.truncate(1000)
    return tensor


ft.get_tensor = read_then_truncate
try:
    merge_checkpoints("average", folder / "base.safetensors", [ft], folder / "out", progress=False, input_hash=None)
except ValueError as err:
    print("ValueError:", err)
"""


@pytest.mark.parametrize("kind", ["safetensors", "ckpt"])
def test_input_truncated_while_merging_is_an_error_naming_it_not_sigbus(tmp_path, kind):
    """The file is truncated right after its first tensor is read, as by another process. Run in a child process:
    touching a memory map of a truncated file kills the process with SIGBUS (return code -7)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])}  # the parent's lightning_merge
    done = subprocess.run([sys.executable, "-c", TRUNCATE_WHILE_MERGING, str(tmp_path), kind], capture_output=True,
                          text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    name = "t.safetensors" if kind == "safetensors" else "t.ckpt"
    assert f"ValueError: Expected '{tmp_path / name}' to hold the bytes" in done.stdout
    assert "of key 'w" in done.stdout and "truncated or rewritten while the merge ran" in done.stdout
    assert not (tmp_path / "out").exists()


def test_safetensors_file_rewritten_shorter_after_opening_is_refused(tmp_path, inputs):
    copy = tmp_path / "t1.safetensors"
    copy.write_bytes((inputs / "t1.safetensors").read_bytes())
    source = open_source(copy)
    copy.write_bytes(copy.read_bytes()[:-10])  # the last tensor loses its last bytes
    last = max(source.keys(), key=lambda k: source.location(k)[2])
    with pytest.raises(ValueError, match=rf"'{copy}' to hold the bytes \d+\.\.\d+ of key '{last}'.* ends at \d+"):
        source.get_tensor(last)


# ------------------------------------------------------------------------------ a zip record shorter than its tensor
def lengthen_first_tensor(path: Path, numel: int) -> None:
    """Make the pickle of a ``torch.save`` zip claim ``numel`` elements for its first storage and tensor (one byte
    each, so the file keeps its length and layout), fixing the CRC-32 of ``data.pkl`` in both zip headers."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith("/data.pkl"))
        pkl = bytearray(archive.read(info))
    ops = list(pickletools.genops(bytes(pkl)))
    persid = next(i for i, (op, _, _) in enumerate(ops) if op.name == "BINPERSID")
    numel_op = max(i for i in range(persid) if ops[i][0].name == "BININT1")  # the storage's numel in its id
    size_op = next(i for i in range(persid, len(ops)) if ops[i][0].name == "BININT1" and ops[i][1] == ops[numel_op][1])
    for i in (numel_op, size_op):
        pkl[ops[i][2] + 1] = numel
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len
    data[start:start + len(pkl)] = pkl
    crc = struct.pack("<I", zlib.crc32(pkl))
    data[info.header_offset + 14:info.header_offset + 18] = crc  # the local header
    central = data.index(b"PK\x01\x02" + data[info.header_offset + 4:info.header_offset + 6])
    while bytes(data[central + 46:central + 46 + len(info.filename)]) != info.filename.encode():
        name_len, extra_len, comment_len = struct.unpack("<HHH", data[central + 28:central + 34])
        central += 46 + name_len + extra_len + comment_len
    data[central + 16:central + 20] = crc  # the central directory
    path.write_bytes(bytes(data))


def test_zip_checkpoint_whose_record_is_shorter_than_its_tensor_is_refused(tmp_path, inputs, capsys):
    bad = tmp_path / "short.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(4), "b": torch.full((4,), 7.0)}}, bad)
    lengthen_first_tensor(bad, 40)
    # control: the plain load refuses the record, the memory-mapped load reads the next 144 bytes of the file
    with pytest.raises(RuntimeError, match="record size"):
        torch.load(bad, weights_only=True)
    assert torch.load(bad, weights_only=True, mmap=True)["state_dict"]["w"].shape == (40,)
    with pytest.raises(ValueError, match=rf"'{bad}' as a torch checkpoint: a tensor claims more bytes than its"
                                         r" record in the zip archive holds"):
        open_source(bad)
    err = cli_error(merge_argv(bad, [inputs / "t0.safetensors"], tmp_path / "out"), capsys)
    assert "short.ckpt" in err and "claims more bytes than its record" in err
    assert not (tmp_path / "out").exists()


def test_torch_checkpoints_read_exactly_including_views_and_legacy_files(tmp_path):
    """The explicit reads of a zip file, against the tensors saved: shared storages, offsets, transposes, empty."""
    state = {"a": torch.arange(10.0), "h": torch.ones(3, 4, dtype=torch.float16), "i": torch.arange(5),
             "e": torch.zeros(0), "flag": torch.tensor(True), "bf": torch.randn(2, 3).bfloat16()}
    state["view"], state["t"] = state["a"][2:5], torch.arange(12.0).view(3, 4).T
    torch.save(state, tmp_path / "zip.pt")
    torch.save({"state_dict": state}, tmp_path / "legacy.ckpt", _use_new_zipfile_serialization=False)
    for name in ("zip.pt", "legacy.ckpt"):
        source = open_source(tmp_path / name)
        for key, expected in state.items():
            got = source.get_tensor(key)
            assert got.dtype == expected.dtype and torch.equal(got, expected), (name, key)


@pytest.mark.parametrize("content", [b"hello world\n", b"<!DOCTYPE html><html>", b"",
                                     b"version https://git-lfs.github.com/spec/v1\n"], ids=["text", "html", "empty",
                                                                                            "lfs-pointer"])
def test_a_file_that_is_not_a_torch_checkpoint_is_one_line_naming_it(tmp_path, inputs, capsys, content):
    bad = tmp_path / "model.ckpt"
    bad.write_bytes(content)
    with pytest.raises(ValueError, match=rf"Could not read '{bad}' as a torch checkpoint: it starts with"):
        open_source(bad)
    err = cli_error(merge_argv(inputs / "base.safetensors", [bad], tmp_path / "out"), capsys)
    assert "model.ckpt" in err and "neither a zip archive (torch.save) nor a pickle" in err


# ------------------------------------------------------------------------------------ shard indexes that leave
def sharded(folder: Path, state: dict) -> Path:
    folder.mkdir()
    names = {}
    for i, (key, value) in enumerate(state.items()):
        names[key] = f"model-{i:05d}.safetensors"
        save_file({key: value}, str(folder / names[key]))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": names}))
    return folder


@pytest.mark.parametrize("where", ["absolute", "dotdot", "dotdot-inside", "link"])
def test_shard_index_naming_a_file_outside_the_folder_is_refused(tmp_path, inputs, capsys, where):
    secret = tmp_path / "secret" / "private.safetensors"
    secret.parent.mkdir()
    save_file({"w": torch.full((16, 8), 42.0)}, str(secret))  # a valid checkpoint with the key: it would be merged
    base = {"w": torch.zeros(16, 8), "b": torch.zeros(16)}
    folder = sharded(tmp_path / "hf", base)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"]["w"] = {"absolute": str(secret), "dotdot": "../secret/private.safetensors",
                                "dotdot-inside": "sub/../../secret/private.safetensors",
                                "link": "linked.safetensors"}[where]
    if where == "link":
        (folder / "linked.safetensors").symlink_to(secret)
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    expected = (r"'linked\.safetensors' \(key 'w' of the shard index '.*index\.json'\) to be a file inside the"
                r" model folder .* but it links to .*private\.safetensors' outside it" if where == "link" else
                r"key 'w' of the shard index '.*index\.json' to name a file inside the model folder '.*hf', but got")
    with pytest.raises(ValueError, match=expected):
        open_source(folder)
    err = cli_error(merge_argv(inputs / "base.safetensors", [folder], tmp_path / "out"), capsys)
    assert "private.safetensors" in err or "linked.safetensors" in err
    assert not (tmp_path / "out").exists()


def test_shard_index_with_a_weight_map_of_the_wrong_type_is_refused(tmp_path):
    folder = sharded(tmp_path / "hf", {"w": torch.zeros(2)})
    for weight_map in ([["w", "x"]], {"w": 5}, {"w": ""}):
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
        with pytest.raises(ValueError, match=r"shard index '.*index\.json'"):
            open_source(folder)


def test_hugging_face_cache_links_to_blobs_are_still_read(tmp_path):
    """The cache's own layout, snapshots/<rev>/<name> -> ../../blobs/<hash>, stays readable."""
    repo = tmp_path / "models--org--m"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    state = {"w": torch.arange(6.0).view(2, 3), "b": torch.ones(2)}
    for i, key in enumerate(state):
        save_file({key: state[key]}, str(repo / "blobs" / f"blob{i}"))
        (snapshot / f"model-{i}.safetensors").symlink_to(Path("..", "..", "blobs", f"blob{i}"))
    (repo / "blobs" / "index").write_text(json.dumps({"weight_map": {"w": "model-0.safetensors",
                                                                     "b": "model-1.safetensors"}}))
    (snapshot / "model.safetensors.index.json").symlink_to(Path("..", "..", "blobs", "index"))
    source = open_source(snapshot)
    assert all(torch.equal(source.get_tensor(k), v) for k, v in state.items())


# --------------------------------------------------------------------------------------- kinds that mismatch
def test_integer_tensor_where_the_base_holds_a_float_is_refused(tmp_path, inputs, capsys):
    bad = tmp_path / "int.safetensors"
    save_file({"w": torch.ones(16, 8, dtype=torch.int64), "b": torch.zeros(16)}, str(bad))
    with pytest.raises(ValueError, match=rf"Key 'w' is torch.float32 in the base .* but torch.int64 in the fine-tuned"
                                         rf" checkpoint '{bad}'.*HINT: exclude it \(exclude=\['w'\]\)"):
        merge_checkpoints("average", inputs / "base.safetensors", [inputs / "t0.safetensors", bad], tmp_path / "out",
                          progress=False)
    err = cli_error(merge_argv(inputs / "base.safetensors", [inputs / "t0.safetensors", bad], tmp_path / "out"), capsys)
    assert "torch.int64" in err and "--exclude w" in err and "--no-strict" in err
    record = merge_checkpoints("average", inputs / "base.safetensors", [inputs / "t0.safetensors", bad],
                               tmp_path / "out", progress=False, strict=False)
    assert "w" not in record.merged_keys and record.skipped["w"].startswith("torch.int64 in")
    merged = open_source(tmp_path / "out" / "model.safetensors")
    assert torch.equal(merged.get_tensor("w"), open_source(inputs / "base.safetensors").get_tensor("w"))


def test_integer_buffers_are_copied_from_the_base_and_not_counted_as_missing(tmp_path):
    """``position_ids`` (int64) is a buffer: a fine-tune may lack it, or have it where the base does not."""
    g = torch.Generator().manual_seed(1)
    base = {"w": torch.randn(4, 3, generator=g), "pooler.dense.weight": torch.randn(2, 2, generator=g),
            "embeddings.position_ids": torch.arange(4)}
    lacks = {"w": base["w"] + 1, "pooler.dense.weight": base["pooler.dense.weight"] + 1}
    plan = plan_merge(open_source(base), [open_source(lacks)])
    assert plan.merge_keys == ("w", "pooler.dense.weight") and "embeddings.position_ids" in plan.skipped
    extra = {**lacks, "embeddings.token_type_ids": torch.zeros(4, dtype=torch.int64)}
    plan = plan_merge(open_source(base), [open_source(extra, label="ft")])
    reason = "non-floating-point buffer only in the fine-tuned 'ft', not written"
    assert plan.skipped["embeddings.token_type_ids"] == reason
    # the count in a missing-key message is over the floating-point parameters (2), not every key (3)
    with pytest.raises(ValueError, match=r"\(1 of 2 base parameters are missing there\)"):
        plan_merge(open_source(base), [open_source({"w": base["w"]})])


def test_nan_in_the_base_is_blamed_on_the_base(tmp_path, inputs, capsys):
    base = open_source(inputs / "base.safetensors")
    state = {k: base.get_tensor(k).clone() for k in base.keys()}
    state["w"][3, 2] = float("nan")
    save_file(state, str(tmp_path / "nan_base.safetensors"))
    fts = [inputs / "t0.safetensors", inputs / "t1.safetensors"]
    with pytest.raises(ValueError, match=r"key 'w': the base '.*nan_base\.safetensors' holds NaN or Inf in it, so"
                                         r" every task vector does; the fine-tuned checkpoints are not to blame"):
        merge_checkpoints("tsv_m", tmp_path / "nan_base.safetensors", fts, tmp_path / "out", progress=False)
    assert "the base" in cli_error(merge_argv(tmp_path / "nan_base.safetensors", fts, tmp_path / "out"), capsys)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------- devices
def absent_cuda() -> str:
    return f"cuda:{torch.cuda.device_count()}"  # cuda:0 without CUDA; one past the last GPU with it


@pytest.mark.parametrize("device", ["meta", "absent-cuda", "cuda:x", "tpu"])
def test_unusable_device_is_one_line_naming_the_argument(tmp_path, inputs, capsys, device):
    device = absent_cuda() if device == "absent-cuda" else device
    with pytest.raises(ValueError, match=r"Expected argument `device` to be"):
        merge_checkpoints("average", inputs / "base.safetensors", [inputs / "t0.safetensors"], tmp_path / "out",
                          device=device, progress=False)
    argv = [*merge_argv(inputs / "base.safetensors", [inputs / "t0.safetensors"], tmp_path / "out"), "--device", device]
    assert "`device`" in cli_error(argv, capsys)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------ hints in the language of the interface
def test_hints_name_the_flags_on_the_command_line_and_the_keywords_in_python(tmp_path, inputs, capsys):
    state = open_source(inputs / "t0.safetensors")
    tuned = {"w": state.get_tensor("w")}  # lacks "b": of 2 parameters, 1 is missing
    save_file(tuned, str(tmp_path / "lacks_b.safetensors"))
    base = {"w": torch.zeros(16, 8), "b": torch.zeros(16), "pooler.dense.weight": torch.zeros(2, 2),
            "position_ids": torch.arange(3)}
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file({"w": torch.ones(16, 8), "b": torch.ones(16), "position_ids": torch.arange(3)},
              str(tmp_path / "no_pooler.safetensors"))
    argv = merge_argv(tmp_path / "base.safetensors", [tmp_path / "no_pooler.safetensors"], tmp_path / "out")
    err = cli_error(argv, capsys)
    assert "(1 of 3 base parameters are missing there)" in err
    assert "HINT: exclude task-specific keys (--exclude 'pooler.dense.*') or pass --no-strict" in err
    assert "exclude=" not in err and "strict=False" not in err
    with pytest.raises(ValueError, match=r"HINT: exclude task-specific keys \(exclude=\['pooler\.dense\.\*'\]\) or"
                                         r" pass strict=False"):
        merge_checkpoints("average", tmp_path / "base.safetensors", [tmp_path / "no_pooler.safetensors"],
                          tmp_path / "out", progress=False)
    # the flags the hint names do what it says
    assert main([*argv, "--exclude", "pooler.dense.*", "--quiet"]) == 0
    assert main([*argv, "--no-strict", "--quiet", "--output", str(tmp_path / "out2")]) == 0
    # other hints: a prefix that matches nothing, a shape mismatch, a merge that overflows float16
    err = cli_error([*merge_argv(inputs / "base.safetensors", [inputs / "t0.safetensors"], tmp_path / "o"),
                     "--prefix", "model."], capsys)
    assert "HINT: drop `--prefix`" in err
    save_file({"w": torch.zeros(32, 8), "b": torch.zeros(16)}, str(tmp_path / "wide.safetensors"))
    err = cli_error(merge_argv(inputs / "base.safetensors", [tmp_path / "wide.safetensors"], tmp_path / "o"), capsys)
    assert "exclude it with --exclude w; or pass --no-strict" in err and "strict=False" not in err
    save_file({"w": torch.full((16, 8), 6e4), "b": torch.zeros(16)}, str(tmp_path / "big.safetensors"))
    save_file({"w": torch.zeros(16, 8, dtype=torch.float16), "b": torch.zeros(16, dtype=torch.float16)},
              str(tmp_path / "half.safetensors"))
    argv = merge_argv(tmp_path / "half.safetensors", [tmp_path / "big.safetensors"] * 2, tmp_path / "o",
                      "task_arithmetic")
    err = cli_error([*argv, "--scaling", "1"], capsys)
    assert "HINT: lower `--scaling` or `--weights`, or merge in a wider dtype (--dtype float32)" in err


def test_a_checkpoint_with_keys_that_are_not_strings_is_refused_naming_it(tmp_path):
    torch.save({"state_dict": {1: torch.zeros(2), "w": torch.zeros(2)}}, tmp_path / "int_keys.ckpt")
    with pytest.raises(ValueError, match=r"'.*int_keys\.ckpt' to hold a state dict of tensors \(str keys\).*"
                                         r"\[1, 'w'\]"):
        open_source(tmp_path / "int_keys.ckpt")


def test_a_safetensors_file_named_ckpt_gets_a_hint(tmp_path, inputs, capsys):
    (tmp_path / "model.ckpt").write_bytes((inputs / "t0.safetensors").read_bytes())
    err = cli_error(merge_argv(inputs / "base.safetensors", [tmp_path / "model.ckpt"], tmp_path / "out"), capsys)
    assert "HINT: it looks like a safetensors file" in err and "name it .safetensors" in err


def test_a_float8_base_merges_to_a_checked_float8_output(tmp_path, inputs):
    """The overflow check of a narrower output dtype runs on float8 too (``sum`` has no float8 kernel on CPU)."""
    base = open_source(inputs / "base.safetensors")
    save_file({k: base.get_tensor(k).to(torch.float8_e4m3fn) for k in base.keys()}, str(tmp_path / "f8.safetensors"))
    merge_checkpoints("average", tmp_path / "f8.safetensors", [inputs / "t0.safetensors"], tmp_path / "out",
                      progress=False)
    merged = open_source(tmp_path / "out" / "model.safetensors")
    assert merged.dtype("w") == torch.float8_e4m3fn and torch.isfinite(merged.get_tensor("w").float()).all()


def test_a_backtracking_exclude_regex_is_an_error_in_bounded_time_not_a_hang(tmp_path):
    # keys come from files and patterns from configs: `(a|aa)+$` on a long key of a's backtracks for minutes in `re`
    hostile_key = "a" * 60 + "!"
    base = {hostile_key: torch.zeros(2, 2), "w": torch.zeros(2, 2)}
    tuned = [{hostile_key: torch.ones(2, 2), "w": torch.ones(2, 2)}]
    code = (
        "import sys, torch; from lightning_merge.engine import plan_merge; from lightning_merge.io import open_source\n"
        f"base = {{{hostile_key!r}: torch.zeros(2, 2), 'w': torch.zeros(2, 2)}}\n"
        "try:\n"
        "    plan_merge(open_source(base), [open_source(dict(base))], exclude=['re:(a|aa)+$'])\n"
        "except ValueError as err:\n"
        "    print(err); sys.exit(3)\n"
    )
    try:
        done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("an `exclude` regex hung the plan")
    assert done.returncode == 3, done.stderr
    assert "`exclude`" in done.stdout and "(a|aa)+$" in done.stdout and "bounded time" in done.stdout
    # an ordinary regex still excludes what it names
    plan = plan_merge(open_source(base), [open_source(t) for t in tuned], exclude=["re:a+!"])
    assert plan.merge_keys == ("w",)
