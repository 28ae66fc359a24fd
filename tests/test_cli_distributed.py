"""``lightning-merge`` on many processes (issue 19, part 1): 2 CPU ranks (gloo), bitwise against one process, and
every failure stopping every rank with the failing rank's message.

The ranks are launched as ``torchrun`` does (``python -m torch.distributed.run``) or as SLURM does (each process
started with its ``SLURM_*`` variables and ``MASTER_ADDR``/``MASTER_PORT``). Every wait is bounded (a timeout on each
child), so a rank left waiting at a collective fails a test instead of hanging it. One thread per process
(``OMP_NUM_THREADS=1``) in both runs: BLAS reductions depend on the thread count.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lightning_merge.cli import main
from lightning_merge.engine import plan_merge, shard_keys
from lightning_merge.engine.distributed import Launch, RankFailedError, Ranks, launch_from_env
from lightning_merge.io import open_source
from lightning_merge.methods import get_method

ROOT = Path(__file__).resolve().parents[1]
BOUND_S = 90  # one launch of 2 ranks, imports on busy CPUs included
STOP_S = 15  # a rank must stop within this time of its peer's failure (a collective's timeout is 10 minutes)
LEGITIMATE = ("world_size", "created", "seconds")  # the record fields that differ from one process


def make_inputs(folder: Path, nan_key: str | None = None) -> list[str]:
    """A base and 3 fine-tunes (safetensors) with matrices, biases, a head and an int buffer; the arguments."""
    g = torch.Generator().manual_seed(0)
    base = {f"layer{i}.weight": torch.randn(40, 24 + i, generator=g) for i in range(6)}
    base |= {f"layer{i}.bias": torch.randn(40, generator=g) for i in range(6)}
    base |= {"head.weight": torch.randn(3, 24, generator=g), "position_ids": torch.arange(7)}
    save_file(base, str(folder / "base.safetensors"))
    for t in range(3):
        tuned = {k: v + 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
                 for k, v in base.items()}
        if nan_key is not None and t == 1:
            tuned[nan_key][0, 0] = float("nan")
        save_file(tuned, str(folder / f"ft{t}.safetensors"))
    return ["--base", str(folder / "base.safetensors"), "--finetuned",
            *[str(folder / f"ft{t}.safetensors") for t in range(3)],
            "--method", "tsv_m", "--exclude", "head.*", "--max-shard-size", "8KB", "--quiet"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "WORLD_SIZE", "RANK", "LOCAL_RANK"))}
    return env | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)} | extra


def slurm_ranks(args_per_rank: list[list[str]]) -> list[subprocess.CompletedProcess]:
    """Start one ``lightning-merge`` per rank as ``srun`` would (``SLURM_STEP_NUM_TASKS``, ``SLURM_PROCID``, ...)."""
    port, n = str(free_port()), len(args_per_rank)
    procs = [subprocess.Popen([sys.executable, "-m", "lightning_merge.cli", *args], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=child_env(SLURM_STEP_NUM_TASKS=str(n), SLURM_PROCID=str(r), SLURM_LOCALID=str(r),
                                            MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
             for r, args in enumerate(args_per_rank)]
    results = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=BOUND_S)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return results


def record_of(folder: Path) -> dict:
    record = json.loads((folder / "merge_record.json").read_text())
    return {k: v for k, v in record.items() if k not in LEGITIMATE}


def assert_nothing_published(folder: Path) -> None:
    assert not (folder / "out").exists()
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".out.")]  # no temporary, no lock left


def test_torchrun_two_ranks_write_the_one_process_output_bitwise(tmp_path):
    """torchrun, 2 CPU ranks, TSV-M into 6 shards: the same file names, every tensor file and the index byte for
    byte, and the same record (input hashes included) but for world size and timings."""
    args = make_inputs(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main([*args, "--output", str(tmp_path / "one")]) == 0
    finally:
        torch.set_num_threads(threads)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                             "-m", "lightning_merge.cli", *args, "--output", str(tmp_path / "two")],
                            cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=BOUND_S)
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = tmp_path / "one", tmp_path / "two"
    names = sorted(p.name for p in one.iterdir())
    assert sorted(p.name for p in two.iterdir()) == names
    assert len([n for n in names if n.endswith(".safetensors")]) == 6
    for name in names:
        if name != "merge_record.json":
            assert (one / name).read_bytes() == (two / name).read_bytes(), name
    assert record_of(one) == record_of(two)
    assert json.loads((two / "merge_record.json").read_text())["world_size"] == 2
    assert all(f["hash"].startswith("xxh3_128:") for entry in record_of(two)["inputs"] for f in entry["files"])


def test_bad_input_on_one_rank_stops_every_rank_with_its_message(tmp_path):
    """SLURM-style launch; rank 1 alone is given a missing file: rank 1 exits 2 with the one-line error naming it,
    rank 0 exits 1 repeating it; nothing is published."""
    args = make_inputs(tmp_path)
    out = ["--output", str(tmp_path / "out")]
    wrong = [a.replace("ft2.safetensors", "missing.safetensors") for a in args]
    rank0, rank1 = slurm_ranks([[*args, *out], [*wrong, *out]])
    assert rank1.returncode == 2 and "missing.safetensors" in rank1.stderr and "not found" in rank1.stderr
    assert rank0.returncode == 1, rank0.stderr[-2000:]
    assert "lightning-merge: error: rank 1 failed: FileNotFoundError:" in rank0.stderr
    assert "missing.safetensors" in rank0.stderr
    assert_nothing_published(tmp_path)


def test_ranks_that_see_different_inputs_are_refused_before_any_work(tmp_path):
    """Rank 1 is given another third fine-tune (one key only; ``--no-strict`` plans it): the plans differ, every rank
    refuses before any work, naming rank 1; nothing is published."""
    args = make_inputs(tmp_path)
    save_file({"layer0.weight": torch.zeros(40, 24)}, str(tmp_path / "small.safetensors"))
    out = ["--output", str(tmp_path / "out"), "--no-strict"]
    other = [a.replace("ft2.safetensors", "small.safetensors") for a in args]
    results = slurm_ranks([[*args, *out], [*other, *out]])
    for result in results:
        assert result.returncode == 2, result.stderr[-2000:]
        assert "rank 1 planned another one than rank 0" in result.stderr
    assert_nothing_published(tmp_path)


def test_error_mid_merge_on_one_rank_stops_every_rank(tmp_path):
    """A NaN in a fine-tune's key that rank 1 merges: rank 1 fails mid-merge naming the key, rank 0 stops with
    that message, and neither the output nor its temporary folder is left."""
    make_inputs(tmp_path)
    base = open_source(str(tmp_path / "base.safetensors"))
    tuned = [open_source(str(tmp_path / f"ft{t}.safetensors")) for t in range(3)]
    plan = plan_merge(base, tuned, exclude=["head.*"])
    key = next(k for k in shard_keys(plan, get_method("tsv_m"), 3, 2)[1] if k.endswith("weight"))
    args = [*make_inputs(tmp_path, nan_key=key), "--output", str(tmp_path / "out")]
    rank0, rank1 = slurm_ranks([args, args])
    assert rank1.returncode == 2 and f"Could not merge key {key!r}" in rank1.stderr, rank1.stderr[-2000:]
    assert rank0.returncode == 1, rank0.stderr[-2000:]
    assert f"rank 1 failed: ValueError: Could not merge key {key!r}" in rank0.stderr
    assert_nothing_published(tmp_path)


def test_launch_from_env(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS", "SLURM_PROCID",
                 "SLURM_LOCALID"):
        monkeypatch.delenv(name, raising=False)
    assert launch_from_env() is None
    monkeypatch.setenv("SLURM_NTASKS", "8")  # a batch script's allocation, the command run without srun
    monkeypatch.setenv("SLURM_PROCID", "0")
    assert launch_from_env() is None  # one process, not rank 0 of 8 waiting for peers
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "1")
    assert launch_from_env() is None  # one task: one process
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "4")
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(ValueError, match=r"MASTER_ADDR.*HINT: under SLURM export MASTER_ADDR"):
        launch_from_env()
    monkeypatch.setenv("MASTER_ADDR", "node1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    assert launch_from_env() == Launch(rank=3, world_size=4, local_rank=1)
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun's variables win
    monkeypatch.setenv("RANK", "5")
    with pytest.raises(ValueError, match=r"rank in \[0, 2\) \(WORLD_SIZE=2\), but got RANK=5"):
        launch_from_env()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(ValueError, match="RANK to be an int, but got 'x'"):
        launch_from_env()


def test_adapters_and_compress_refuse_many_processes(tmp_path, monkeypatch, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "adapter_config.json").write_text("{}")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    code = main(["--finetuned", str(tmp_path / "a"), "--method", "average", "--output", str(tmp_path / "o")])
    assert code == 2
    assert "Expected one process for merging peft adapters, but this is rank 1 of 2" in capsys.readouterr().err


# ---------------------------------------------------------------------- the watchdog, in spawned processes


def _watched_rank(rank: int, port: int, mode: str, folder: str, sigint: str = "python") -> None:
    """One rank: rank 1 fails (raises, or is killed) at once; rank 0 works for up to a minute. ``sigint``: Python's
    handler, or SIGINT ignored as in a process started with ``&`` by a non-interactive shell."""
    import torch.distributed as dist

    # either way whatever the test runner inherited (a runner started with `&` passes SIGINT ignored on)
    signal.signal(signal.SIGINT, signal.SIG_IGN if sigint == "ignored" else signal.default_int_handler)

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    ranks = Ranks()
    start = time.monotonic()

    def work() -> None:
        if rank == 1:
            if mode == "killed":
                os.kill(os.getpid(), signal.SIGKILL)
            raise ValueError("simulated failure on rank 1")
        while time.monotonic() - start < 60:
            time.sleep(0.01)

    try:
        ranks.watched(work)
        outcome = "finished"
    except Exception as err:
        outcome = f"{type(err).__name__}: {err}"
    Path(folder, f"rank{rank}").write_text(f"{time.monotonic() - start}\n{outcome}")


@pytest.mark.parametrize(("mode", "sigint"), [("raises", "python"), ("killed", "python"), ("raises", "ignored")])
def test_watchdog_stops_a_busy_rank_within_seconds(tmp_path, mode, sigint):
    """Rank 1 raises (or is SIGKILLed) at once while rank 0 is in the middle of a minute of work: rank 0 stops
    with RankFailedError well within STOP_S, with rank 1's message (or that it was lost); also when the ranks
    inherited SIGINT ignored (started in the background: rank 0 then worked on for the whole minute)."""
    ctx = multiprocessing.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_watched_rank, args=(r, port, mode, str(tmp_path), sigint)) for r in (0, 1)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(BOUND_S)
        if proc.is_alive():
            proc.kill()
    seconds, outcome = (tmp_path / "rank0").read_text().split("\n", 1)
    assert outcome.startswith(RankFailedError.__name__), outcome
    expected = "rank 1 failed: ValueError: simulated failure on rank 1" if mode == "raises" else "lost contact"
    assert expected in outcome
    assert float(seconds) < STOP_S
    if mode == "raises":
        assert (tmp_path / "rank1").read_text().split("\n", 1)[1] == "ValueError: simulated failure on rank 1"
    else:
        assert procs[1].exitcode == -signal.SIGKILL
