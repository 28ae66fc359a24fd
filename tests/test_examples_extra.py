"""The DDP merge and CLI examples, run in their --fast forms as a user runs them (a subprocess each, in examples/)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(script: str, out: Path) -> str:
    done = subprocess.run([sys.executable, script, "--fast", "--out", str(out)], cwd=EXAMPLES, text=True,
                          capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_ddp_merge_two_ranks_agree_with_each_other_and_a_single_process_merge(tmp_path):
    stdout = run_example("ddp_merge.py", tmp_path)
    assert "on 2 ranks (ddp_spawn)" in stdout
    assert "rank 0 merged" in stdout and "rank 1 merged" in stdout
    assert "-> identical on the 2 ranks" in stdout
    assert "single-process merge_keys over 6 keys" in stdout and "bitwise equal" in stdout
    record = json.loads((tmp_path / "ddp" / "merged" / "merge_record.json").read_text())
    assert record["world_size"] == 2 and sorted(record["excluded_keys"]) == ["head.bias", "head.weight"]


def test_cli_merge_runs_the_command_with_the_yaml_config_and_scores_both_outputs(tmp_path):
    stdout = run_example("cli_merge.py", tmp_path)
    assert "lightning-merge merge --config merge.yaml" in stdout
    assert "merged 6 keys of 3 checkpoints with tsv_m into merged/tsv_m" in stdout
    assert "with task_arithmetic into merged/task_arithmetic" in stdout
    for name in ("tsv_m", "task_arithmetic"):
        folder = tmp_path / "merged" / name
        assert (folder / "merge_record.json").is_file() and (folder / "model.safetensors.index.json").is_file()
    table = stdout[stdout.index("task  "):].splitlines()
    assert table[0].split() == ["task", "pretrained", "fine-tuned", "tsv_m", "task_arithmetic"]
    assert [row.split()[0] for row in table[1:]] == ["flip_lr", "flip_ud", "transpose", "mean"]
    assert all(0.0 <= float(v) <= 1.0 for row in table[1:] for v in row.split()[1:])
