"""The lightning-merge command: flags, YAML config, --help, and one-line errors with exit code 2."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from lightning_merge.cli import build_parser, main, parse_size
from lightning_merge.io import open_source
from lightning_merge.methods import get_method


@pytest.fixture
def files(tmp_path) -> dict[str, object]:
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(6, 4, generator=g), "b": torch.randn(6, generator=g),
            "head.weight": torch.randn(2, 4, generator=g)}
    tuned = []
    for t in range(3):
        state = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        torch.save({"state_dict": {f"model.{k}": v for k, v in state.items()}}, tmp_path / f"t{t}.ckpt")
        tuned.append(state)
    save_file(base, str(tmp_path / "base.safetensors"))
    return {
        "base": base,
        "tuned": tuned,
        "argv": ["--base", str(tmp_path / "base.safetensors"), "--finetuned",
                 *(str(tmp_path / f"t{t}.ckpt") for t in range(3)),
                 "--prefix", "model.", "--base-prefix", "", "--output", str(tmp_path / "out")],
    }


def run_error(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("lightning-merge: error: ") and err.count("\n") == 1 and "Traceback" not in err
    return err


def test_merge_from_flags(tmp_path, files, capsys):
    argv = [*files["argv"], "--method", "tsv_m", "--rank", "2", "--scaling", "0.8", "--exclude", "head.*"]
    assert main(argv) == 0
    assert "merged 2 keys of 3 checkpoints with tsv_m" in capsys.readouterr().out
    method = get_method("tsv_m", rank=2, scaling=0.8)
    merged = open_source(tmp_path / "out")
    for key in ("w", "b"):
        expected = method(files["base"][key], [t[key] for t in files["tuned"]])
        assert torch.equal(merged.get_tensor(key), expected)
    assert torch.equal(merged.get_tensor("head.weight"), files["base"]["head.weight"])
    record = json.loads((tmp_path / "out" / "merge_record.json").read_text())
    assert record["options"]["rank"] == 2 and record["scaling"] == 0.8 and record["excluded_keys"] == ["head.weight"]


def test_sftm_fit_from_flags(tmp_path, files, capsys):
    argv = [*files["argv"], "--method", "sftm", "--fit", "mapping", "--basis", "orthogonal", "--exclude", "head.*"]
    assert main(argv) == 0
    method = get_method("sftm", fit="mapping", basis="orthogonal")
    expected = method(files["base"]["w"], [t["w"] for t in files["tuned"]])
    assert torch.equal(open_source(tmp_path / "out").get_tensor("w"), expected)
    assert json.loads((tmp_path / "out" / "merge_record.json").read_text())["options"]["fit"] == "mapping"


def test_quiet_prints_nothing(tmp_path, files, capsys):
    assert main([*files["argv"], "--method", "average", "--exclude", "head.*", "--quiet"]) == 0
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""


def test_yaml_config_with_flag_override(tmp_path, files, capsys):
    argv = files["argv"]
    config = {
        "base": argv[1], "finetuned": argv[3:6], "prefix": "model.", "base_prefix": "", "output": str(tmp_path / "out"),
        "method": "ties", "density": 0.5, "scaling": 0.5, "exclude": ["head.*"], "quiet": True, "max-shard-size": "1MB",
        "weights": [1, 0.5, 0.25], "strict": True,
    }
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(config))
    assert main(["--config", str(tmp_path / "merge.yaml"), "--scaling", "1.0"]) == 0
    record = json.loads((tmp_path / "out" / "merge_record.json").read_text())
    assert record["method"] == "ties" and record["scaling"] == 1.0
    assert record["options"]["density"] == 0.5 and record["options"]["weights"] == [1.0, 0.5, 0.25]
    method = get_method("ties", density=0.5, scaling=1.0, weights=(1, 0.5, 0.25))
    expected = method(files["base"]["w"], [t["w"] for t in files["tuned"]])
    assert torch.equal(open_source(tmp_path / "out").get_tensor("w"), expected)


@pytest.mark.parametrize(("flag", "algorithm"), [("sha256", "sha256"), ("none", None)])
def test_hash_choice_from_yaml(tmp_path, files, flag, algorithm):
    argv = files["argv"]
    config = {"base": argv[1], "finetuned": argv[3:6], "prefix": "model.", "base_prefix": "", "quiet": True,
              "output": str(tmp_path / "out"), "method": "average", "exclude": ["head.*"], "hash": flag}
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(config))
    assert main(["--config", str(tmp_path / "merge.yaml")]) == 0
    record = json.loads((tmp_path / "out" / "merge_record.json").read_text())
    for entry in (f for i in record["inputs"] for f in i["files"]):
        want = None if algorithm is None else "sha256:" + hashlib.sha256(Path(entry["path"]).read_bytes()).hexdigest()
        assert entry["hash"] == want


def test_yaml_config_errors(tmp_path, files, capsys):
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"method": "tsv_m", "ranks": 3}))
    assert "unknown key 'ranks'" in run_error(["--config", str(tmp_path / "bad.yaml")], capsys)
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    assert "to hold a mapping of argument names" in run_error(["--config", str(tmp_path / "list.yaml")], capsys)
    (tmp_path / "flag.yaml").write_text(yaml.safe_dump({"strict": "maybe"}))
    assert "expected 'strict' to be true or false" in run_error(["--config", str(tmp_path / "flag.yaml")], capsys)
    assert "cannot read --config" in run_error(["--config", str(tmp_path / "missing.yaml")], capsys)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--method", "tsv_m"], r"Key 'head.weight' has shape"),  # head differs below
        (["--method", "tsv_m", "--density", "0.5", "--exclude", "head.*"], r"unknown \['density'\]"),
        (["--method", "tsv_m", "--rank", "abc"], r"argument --rank: invalid"),
        (["--method", "tsv_m", "--rank", "0", "--exclude", "head.*"], r"Expected argument `rank` to be"),
        (["--method", "nope"], r"argument --method: invalid choice: 'nope'"),
        (["--method", "average", "--device", "gpu0", "--exclude", "head.*"], r"Expected argument `device`"),
        (["--method", "average", "--max-shard-size", "lots"], r"expected 'max_shard_size' to be a size such as 5GB"),
        (["--method", "average", "--hash", "md5"], r"argument --hash: invalid choice: 'md5'"),
    ],
)
def test_bad_input_is_one_line_exit_2(tmp_path, files, capsys, extra, message):
    torch.save({"state_dict": {"model.w": files["base"]["w"], "model.b": files["base"]["b"],
                               "model.head.weight": torch.zeros(5, 4)}}, tmp_path / "t2.ckpt")
    err = run_error([*files["argv"], *extra], capsys)
    assert __import__("re").search(message, err), err
    assert not (tmp_path / "out").exists()


def test_bad_files_are_one_line_errors(tmp_path, files, capsys):
    argv = [*files["argv"], "--method", "average", "--exclude", "head.*"]
    missing = [a if not a.endswith("t1.ckpt") else str(tmp_path / "nope.ckpt") for a in argv]
    err = run_error(missing, capsys)  # names which input it is, not the library's internal `src`
    assert "nope.ckpt' (not found)" in err and "`finetuned[1]`" in err, err
    (tmp_path / "evil.ckpt").write_bytes(
        b"\x80\x04\x95\x1d\x00\x00\x00\x00\x00\x00\x00\x8c\x02os\x94\x8c\x06system\x94\x93\x94.")
    evil = [a if not a.endswith("t1.ckpt") else str(tmp_path / "evil.ckpt") for a in argv]
    assert "Refusing to load" in run_error(evil, capsys)
    (tmp_path / "out").mkdir()
    assert "already exists. HINT: pass overwrite=True (--overwrite)" in run_error(argv, capsys)
    assert main([*argv, "--overwrite", "--quiet"]) == 0
    assert "the following arguments are required: --base" in run_error(["--method", "average"], capsys)


def test_help_documents_every_option(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    for action in build_parser()._actions:
        for flag in action.option_strings:
            assert flag in text
        assert action.help, action.dest
    for option in ("--rank", "--density", "--basis", "--fit", "--embeddings", "--rcond", "--solver", "--weights",
                   "--scaling", "--no-strict"):
        assert option in text


def test_parse_size():
    assert parse_size("5GiB") == 5 * 2**30 and parse_size("500MB") == 500 * 10**6 and parse_size("1024") == 1024
    assert parse_size("1.5 MB") == 1_500_000 and parse_size(".5KiB") == 512


@pytest.mark.parametrize("text", ["9" * 400, "1.2.3", "1e9", "-5GB", "5 parsecs", ""])
def test_bad_sizes_are_one_line_errors(tmp_path, files, capsys, text):
    with pytest.raises(ValueError, match="expected a (positive )?size"):
        parse_size(text)
    message = run_error([*files["argv"], "--method", "average", "--max-shard-size", text], capsys)
    assert "--max-shard-size" in message


def test_console_entry_point_exit_code(tmp_path):
    cmd = [sys.executable, "-m", "lightning_merge.cli", "--base", str(tmp_path / "b.ckpt"), "--finetuned",
           str(tmp_path / "f.ckpt"), "--method", "average", "--output", str(tmp_path / "o")]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=Path(__file__).parents[1])
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and "not found" in result.stderr
