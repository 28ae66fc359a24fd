"""The digits job in its fast form: it must run offline from a fresh checkout and produce its table and files."""

import json
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_digits_job_fast_prints_the_table_and_writes_the_report(tmp_path):
    out = subprocess.run([sys.executable, "digits_job.py", "--fast", "--out", str(tmp_path)], cwd=EXAMPLES,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert sum(line.startswith("[") and "fine-tuned" in line for line in lines) == 8
    header = next(line for line in lines if line.startswith("accuracy"))
    for column in ("pretrained", "finetuned", "task_arithmetic", "ties", "tsv_m", "sftm", "sftm_orthogonal"):
        assert column in header
    assert any(line.startswith("mean") for line in lines) and any(line.startswith("scaling") for line in lines)
    assert sum("mean normalized accuracy" in line for line in lines) == 3
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report["scaling"]) == {"average", "task_arithmetic", "ties", "tsv_m", "sftm", "sftm_orthogonal"}
    for name in ("report.csv", "report.png", "merge/merged/model.safetensors", "merge/merged/merge_record.json"):
        assert (tmp_path / name).is_file(), name
