"""Hostile and careless outputs (issue 17, classes 1-4): names that become paths, outputs that clobber, concurrent
writers, and the debris of interrupted runs.

Every refusal must come before any work, name the path, and leave what the user owns byte for byte as it was; the
signal and concurrency cases run real subprocesses (a merge held inside its output block until the test lets it go).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lightning_merge.cli import main
from lightning_merge.compress import compress_checkpoints
from lightning_merge.engine import merge_checkpoints
from lightning_merge.io import RECORD_FILE, MergeRecord, check_output, publish_folder
from lightning_merge.io import output as output_module
from lightning_merge.lora import load_adapter, merge_adapters
from tests._robustness_helpers import sha256_tree

REPO = Path(__file__).resolve().parents[1]
KEY = "base_model.model.layers.0.proj"

# A command-line merge that stops inside its output block (when it saves its record, the weights written) until the
# file `go` appears; it first writes its temporary folder's path into `started`.
HELD_MERGE = r"""
import pathlib, sys, time
from lightning_merge.io.record import MergeRecord
started, go = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
save = MergeRecord.save
def held(self, folder):
    started.write_text(str(folder))
    while not go.exists():
        time.sleep(0.01)
    return save(self, folder)
MergeRecord.save = held
from lightning_merge.cli import main
sys.exit(main(sys.argv[3:]))
"""


# ------------------------------------------------------------------------------------------------ inputs
def _adapter(folder: Path, seed: int) -> Path:
    g = torch.Generator().manual_seed(seed)
    folder.mkdir()
    save_file({f"{KEY}.lora_A.weight": torch.randn(2, 12, generator=g),
               f"{KEY}.lora_B.weight": torch.randn(16, 2, generator=g)}, str(folder / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["proj"]}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture
def inputs(tmp_path):
    """A base folder, two fine-tuned files and two adapters in ``tmp_path/in``; after the test, not a byte of them
    may have changed."""
    folder = tmp_path / "in"
    (folder / "base").mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    base = {"layers.0.proj.weight": torch.randn(16, 12, generator=g), "layers.0.norm.weight": torch.ones(12)}
    save_file(base, str(folder / "base" / "model.safetensors"))
    for t in range(2):
        save_file({k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()},
                  str(folder / f"t{t}.safetensors"))
        _adapter(folder / f"a{t}", t)
    before = sha256_tree(folder)
    yield folder
    assert sha256_tree(folder) == before


def argv(workflow: str, inputs: Path, output: str | Path) -> list[str]:
    """The command line of each workflow that writes an output folder."""
    tuned = [str(inputs / "t0.safetensors"), str(inputs / "t1.safetensors")]
    adapters = [str(inputs / "a0"), str(inputs / "a1")]
    return {
        "checkpoints": ["--base", str(inputs / "base"), "--finetuned", *tuned, "--method", "average"],
        "adapters": ["--finetuned", *adapters, "--method", "average"],
        "into_base": ["--finetuned", *adapters, "--method", "average", "--merge-into-base", "--base",
                      str(inputs / "base")],
        "compress": ["compress", "--base", str(inputs / "base"), "--finetuned", *tuned, "--rank", "1"],
    }[workflow] + ["--output", str(output), "--quiet"]


WORKFLOWS = ["checkpoints", "adapters", "into_base", "compress"]


def cli_error(args: list[str], capsys) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("lightning-merge: error: ") and err.count("\n") == 1, err
    return err


def hidden(folder: Path) -> list[str]:
    """The hidden siblings of ``folder``: temporaries, old outputs moved aside, lock files."""
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}."))


def user_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "notes.txt").write_text("mine")
    (path / "sub").mkdir()
    (path / "sub" / "data.csv").write_text("1,2")
    return path


# --------------------------------------------------------------------------------------- 1. names become paths
def test_hostile_task_names_of_the_callback_stay_inside_its_folder(tmp_path):
    """Workflow 2: names with `..`, an absolute path and `../model` become safe file names inside merged/heads."""
    from lightning_merge.callbacks import MergeCallback
    from tests._callback_helpers import pretrained_state, task_loader, task_module, trainer

    base = pretrained_state()
    save_file(base, str(tmp_path / "base.safetensors"))
    victim = tmp_path / "victim"
    victim.write_text("the user's file")
    names = ["../../x", str(victim), "../model"]
    tuned = {}
    for i, name in enumerate(names):
        tuned[name] = tmp_path / f"t{i}.safetensors"
        save_file({k: v + 0.01 * (i + 1) for k, v in base.items()}, str(tuned[name]))
    before = {p.name for p in tmp_path.parent.iterdir()}, {p.name for p in tmp_path.iterdir()}
    merge = MergeCallback("average", base=tmp_path / "base.safetensors", finetuned=tuned, exclude=["head.*"],
                          dirpath=tmp_path / "m", progress=False)
    trainer(tmp_path / "root", [merge], max_epochs=1, limit_train_batches=1).fit(task_module(base), task_loader(0))
    assert victim.read_text() == "the user's file"
    assert {p.name for p in tmp_path.parent.iterdir()} == before[0]  # nothing written beside the test's folder
    assert {p.name for p in tmp_path.iterdir()} - before[1] <= {"m", "root"}
    heads = sorted(p.name for p in (tmp_path / "m" / "merged" / "heads").iterdir())
    safe_victim = str(victim).replace("/", "_") + ".safetensors"
    assert heads == sorted(["_._.._x.safetensors", "_._model.safetensors", safe_victim])
    merged = load_file(str(tmp_path / "m" / "merged" / "model.safetensors"))
    assert sorted(merged) == sorted(base)  # the merged body, not one task's head
    assert MergeRecord.load(tmp_path / "m" / "merged").tasks == names


@pytest.mark.parametrize("name", ["../x", "/etc/x", "a/b", "..", ".", ".hidden", "merge_record.json", "", "a\0b"])
def test_compress_refuses_a_task_name_that_is_a_path_before_any_work(inputs, tmp_path, name):
    with pytest.raises(ValueError, match=r"Expected task name 0 to be"):
        compress_checkpoints(inputs / "base", {name: inputs / "t0.safetensors"}, tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


# ------------------------------------------------------------------------------------ 2. outputs that clobber
def test_merge_adapters_refuses_an_input_adapter_as_output(inputs):
    for output in (inputs / "a0", inputs / "a1" / "merged"):
        with pytest.raises(ValueError, match=r"Expected argument `output_dir` to be outside the inputs, but .*a"):
            merge_adapters("average", [inputs / "a0", inputs / "a1"], output, overwrite=True)
    link = inputs.parent / "link"
    link.symlink_to(inputs / "a0")  # an output inside an input through a link
    with pytest.raises(ValueError, match=r"'.*link/merged' lies inside the input"):
        merge_adapters("average", [inputs / "a0", inputs / "a1"], link / "merged")
    link.unlink()


def test_merge_adapters_replaces_only_its_own_previous_output(inputs, tmp_path):
    adapters = [inputs / "a0", inputs / "a1"]
    mine = user_folder(tmp_path / "mine")
    before = sha256_tree(mine)
    with pytest.raises(FileExistsError, match=r"'.*mine' already exists\. HINT: pass overwrite=True"):
        merge_adapters("average", adapters, mine)
    with pytest.raises(ValueError, match=r"`output_dir` to be a previous output of lightning-merge to replace, but"
                                         r" '.*mine' holds no merge_record.json"):
        merge_adapters("average", adapters, mine, overwrite=True)
    assert sha256_tree(mine) == before and hidden(mine) == []
    merged = merge_adapters("average", adapters, tmp_path / "out")
    record = MergeRecord.load(tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(record.outputs)
    assert [Path(i["name"]).name for i in record.inputs] == ["a0", "a1"] and record.method == "average"
    assert all(f["hash"].startswith("xxh3_128:") for i in record.inputs for f in i["files"])
    again = merge_adapters("task_arithmetic", adapters, tmp_path / "out", overwrite=True)  # its own: replaced
    assert MergeRecord.load(tmp_path / "out").method == "task_arithmetic" and merged.path == again.path
    assert load_adapter(tmp_path / "out").modules.keys() == merged.modules.keys()
    (tmp_path / "out" / "plot.png").write_bytes(b"the user's plot")  # added by the user: now theirs
    with pytest.raises(ValueError, match=r"holds 'plot.png', which its merge_record.json does not list"):
        merge_adapters("average", adapters, tmp_path / "out", overwrite=True)
    assert (tmp_path / "out" / "plot.png").read_bytes() == b"the user's plot"


@pytest.mark.parametrize("folder", ["base", "merged", "task-01-beta", "compressed"])
def test_the_callback_refuses_a_users_folder_in_dirpath_before_training(tmp_path, folder):
    from lightning_merge.callbacks import MergeCallback
    from tests._callback_helpers import TASKS, CrashAtEpoch, pretrained_state, task_loader, task_module, trainer

    mine = user_folder(tmp_path / "m" / folder)
    before = sha256_tree(tmp_path / "m")
    merge = MergeCallback("average", tasks=TASKS, exclude=["head.*"], dirpath=tmp_path / "m", progress=False)
    with pytest.raises(ValueError, match=rf"`dirpath` '.*m' to hold no folder a run replaces unless lightning-merge"
                                         rf" wrote it, but '{mine}' holds no merge_record.json"):
        trainer(tmp_path, [merge, CrashAtEpoch(0)]).fit(task_module(pretrained_state()), task_loader(0))
    assert sha256_tree(tmp_path / "m") == before  # refused in setup: no snapshot, no manifest
    if folder in ("merged", "compressed"):  # workflow 2 writes these two
        save_file(pretrained_state(), str(tmp_path / "base.safetensors"))
        given = MergeCallback("average", base=tmp_path / "base.safetensors", exclude=["head.*"],
                              finetuned={"a": tmp_path / "base.safetensors"}, dirpath=tmp_path / "m", progress=False)
        with pytest.raises(ValueError, match=rf"but '{mine}' holds no merge_record.json"):
            trainer(tmp_path, [given, CrashAtEpoch(0)]).fit(task_module(pretrained_state()), task_loader(0))
        assert sha256_tree(tmp_path / "m") == before


def test_a_run_whose_first_fit_was_interrupted_restarts_in_the_next_process(tmp_path):
    """The manifest is written with the first snapshot (so the folder is a run's), and a run that recorded no task
    is not resumed: the next process (a new callback) starts anew there, with no task named."""
    from lightning_merge.callbacks import MergeCallback
    from tests._callback_helpers import TASKS, CrashAtEpoch, pretrained_state, task_loader, task_module, trainer

    def callback() -> MergeCallback:
        return MergeCallback("average", tasks=TASKS, exclude=["head.*"], dirpath=tmp_path / "m", progress=False)

    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer(tmp_path, [callback(), CrashAtEpoch(0)]).fit(task_module(pretrained_state()), task_loader(0))
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["base", "manifest.json"]
    merge = callback()
    trainer(tmp_path, [merge], max_epochs=1).fit(task_module(pretrained_state()), task_loader(0))
    assert merge.collected == ["alpha"]


@pytest.mark.parametrize("workflow", WORKFLOWS)
@pytest.mark.parametrize("target", ["user folder", "plain file", "dot", "parent of an input", "link"])
def test_overwrite_refuses_what_is_not_a_previous_output(inputs, tmp_path, monkeypatch, capsys, workflow, target):
    monkeypatch.chdir(user_folder(tmp_path / "work"))
    mine = user_folder(tmp_path / "mine")
    (tmp_path / "file").write_text("a plain file")
    (tmp_path / "link").symlink_to(mine)
    output, reason = {
        "user folder": (mine, "holds no merge_record.json"),
        "plain file": (tmp_path / "file", "is a file"),
        "dot": (".", "is the working directory or holds it"),
        "parent of an input": (inputs, "holds the input"),
        "link": (tmp_path / "link", "is a symbolic link"),
    }[target]
    before = sha256_tree(tmp_path)
    err = cli_error([*argv(workflow, inputs, output), "--overwrite"], capsys)
    assert reason in err and str(Path(output).absolute()) in err
    assert sha256_tree(tmp_path) == before  # nothing replaced, nothing added (no temporary, no lock file)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "in", "link", "mine", "work"]


@pytest.mark.parametrize("workflow", WORKFLOWS)
def test_overwrite_replaces_a_previous_output_but_not_a_users_folder(inputs, tmp_path, capsys, workflow):
    mine = user_folder(tmp_path / "mine")
    before = sha256_tree(mine)
    err = cli_error([*argv(workflow, inputs, mine), "--overwrite"], capsys)
    assert f"'{mine}' holds no merge_record.json; overwrite=True replaces only a folder this library wrote" in err
    assert sha256_tree(mine) == before
    assert main(argv(workflow, inputs, tmp_path / "out")) == 0
    assert "already exists" in cli_error(argv(workflow, inputs, tmp_path / "out"), capsys)
    assert main([*argv(workflow, inputs, tmp_path / "out"), "--overwrite"]) == 0
    assert MergeRecord.load(tmp_path / "out").outputs and hidden(tmp_path / "out") == []


def test_an_unset_shell_variable_is_refused(inputs, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(user_folder(tmp_path / "work"))
    before = sha256_tree(tmp_path)
    for workflow in WORKFLOWS:
        cli_error([*argv(workflow, inputs, ""), "--overwrite"], capsys)
    with pytest.raises(TypeError, match="Expected argument `output_dir` to be a folder path, but got ''"):
        merge_adapters("average", [inputs / "a0"], "", overwrite=True)
    assert sha256_tree(tmp_path) == before


def test_an_empty_dirpath_or_a_nul_in_a_path_is_refused(tmp_path):
    from lightning_merge.callbacks import MergeCallback

    for dirpath in ("", "a\0b"):
        with pytest.raises(ValueError, match=r"Expected argument `dirpath` to be None or a folder path"):
            MergeCallback("average", tasks=["a", "b"], dirpath=dirpath)
    with pytest.raises(ValueError, match=r"Expected argument `output` to be a folder path, but .* holds a NUL"):
        check_output(str(tmp_path / "a\0b"), overwrite=True)


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        (None, "holds no merge_record.json"),
        ("{not json", "that is not this library's"),
        (json.dumps({"method": "average"}), "that is not this library's"),
        (json.dumps({"method": 1, "options": {}, "scaling": 1.0, "inputs": [], "outputs": [], "merged_keys": []}),
         r"`method` in .* to be a string"),
        (json.dumps({"method": "a", "options": {}, "scaling": 1.0, "inputs": [], "outputs": "x", "merged_keys": []}),
         r"`outputs` in .* to be a list of file names"),
        (json.dumps({"method": "a", "options": {}, "scaling": 1.0, "inputs": [], "outputs": ["w"], "merged_keys": []}),
         "holds 'data.csv', which its merge_record.json does not list"),
    ],
)
def test_a_forged_or_broken_record_does_not_make_a_folder_replaceable(tmp_path, record, reason):
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "data.csv").write_text("the user's data")
    if record is not None:
        (folder / RECORD_FILE).write_text(record)
    with pytest.raises(ValueError, match=reason):
        check_output(folder, overwrite=True)
    with pytest.raises(ValueError, match=reason), publish_folder(folder, overwrite=True):
        pass
    assert (folder / "data.csv").read_text() == "the user's data" and hidden(folder) == []


def test_an_output_that_appears_after_the_check_is_not_replaced(tmp_path):
    """check_output passed for a new path; another program creates it before the lock: publish_folder refuses."""
    out = check_output(tmp_path / "out", overwrite=False)
    user_folder(out)
    with pytest.raises(FileExistsError, match="already exists"), publish_folder(out, overwrite=False) as tmp:
        (tmp / "x").write_text("never published")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "sub"] and hidden(out) == []


def test_an_empty_folder_or_a_missing_one_may_be_written(tmp_path):
    (tmp_path / "empty").mkdir()
    assert check_output(tmp_path / "empty", overwrite=True) == tmp_path / "empty"
    with pytest.raises(FileExistsError):
        check_output(tmp_path / "empty", overwrite=False)
    assert check_output(tmp_path / "new", overwrite=True) == tmp_path / "new"


# ------------------------------------------------------------------------------------ 3. concurrent writers
def test_a_second_writer_to_the_same_output_fails_at_once(tmp_path):
    out = tmp_path / "out"
    with publish_folder(out, overwrite=False) as tmp:
        (tmp / "a").write_text("first")
        assert hidden(out) == sorted([tmp.name, ".out.lightning-merge-lock"])
        with pytest.raises(BlockingIOError, match=rf"another one \(pid {os.getpid()} on host .*\) is writing"
                                                  rf" '{out}' now"), publish_folder(out, overwrite=False):
            pass
        with publish_folder(tmp_path / "other") as other:  # another output: no conflict
            (other / "b").write_text("b")
    assert (out / "a").read_text() == "first" and hidden(out) == []  # the lock file is removed on success
    with pytest.raises(RuntimeError), publish_folder(out):
        raise RuntimeError("failed")
    assert hidden(out) == []  # and on an error


def test_a_planted_link_as_lock_file_is_never_followed(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("the user's file")
    (tmp_path / ".out.lightning-merge-lock").symlink_to(victim)
    with pytest.raises(OSError, match=r"\.out\.lightning-merge-lock"), publish_folder(tmp_path / "out"):
        pass
    assert victim.read_text() == "the user's file" and not (tmp_path / "out").exists()


def _start_held(tmp_path: Path, args: list[str]) -> tuple[subprocess.Popen, Path]:
    script = tmp_path / "held_merge.py"
    script.write_text(HELD_MERGE)
    started, go = tmp_path / "started", tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen([sys.executable, str(script), str(started), str(go), *args], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300  # a guard against a hang, not a timed assertion
    while not started.exists():
        if child.poll() is not None or time.monotonic() > deadline:
            child.kill()
            pytest.fail(f"the held merge did not start: {child.communicate()}")
        time.sleep(0.02)
    return child, go


@pytest.fixture
def children():
    started: list[subprocess.Popen] = []
    yield started
    for child in started:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_two_concurrent_merges_to_one_output_one_wins_the_other_fails_clearly(inputs, tmp_path, capsys, children):
    out = tmp_path / "out"
    child, go = _start_held(tmp_path, argv("checkpoints", inputs, out))
    children.append(child)
    with pytest.raises(BlockingIOError, match=rf"another one \(pid {child.pid} on host .*\) is writing '{out}' now"):
        merge_checkpoints("task_arithmetic", inputs / "base", [inputs / "t0.safetensors"], out, progress=False)
    assert f"(pid {child.pid} on host" in cli_error([*argv("adapters", inputs, out), "--overwrite"], capsys)
    go.touch()
    assert child.wait() == 0, child.communicate()
    record = MergeRecord.load(out)
    assert record.method == "average" and len(record.inputs) == 3  # the first writer's merge, whole
    assert hidden(out) == []


# ------------------------------------------------------------------------------------ 4. debris
def test_sigterm_leaves_no_debris_and_keeps_the_previous_output(inputs, tmp_path, children):
    out = tmp_path / "out"
    assert main(argv("checkpoints", inputs, out)) == 0
    before = sha256_tree(out)
    child, _ = _start_held(tmp_path, [*argv("checkpoints", inputs, out), "--overwrite"])
    children.append(child)
    assert any(p.name.startswith(".out.lightning-merge-tmp-") for p in tmp_path.iterdir())  # the held temporary
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=300)
    assert child.returncode == 130 and "interrupted; no output was written" in err  # handled like Ctrl-C
    assert sha256_tree(out) == before and hidden(out) == []  # no temporary, no old output, no lock file


def test_sigkill_debris_is_removed_by_the_next_run(inputs, tmp_path, children):
    out = tmp_path / "out"
    child, _ = _start_held(tmp_path, argv("checkpoints", inputs, out))
    children.append(child)
    child.kill()
    child.wait()
    left = hidden(out)
    assert len(left) == 2 and ".out.lightning-merge-lock" in left  # what a killed writer cannot clean up
    tmp = next(p for p in tmp_path.iterdir() if p.name.startswith(".out.lightning-merge-tmp-"))
    assert (tmp / "model.safetensors").is_file()
    assert output_module.stale_temporaries(out) == [tmp]  # its process is dead: stale; the lock is free
    assert main(argv("checkpoints", inputs, out)) == 0
    assert hidden(out) == [] and MergeRecord.load(out).method == "average"


def test_sigterm_inside_the_block_is_a_keyboard_interrupt_and_the_handler_is_restored(tmp_path):
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    with pytest.raises(KeyboardInterrupt, match="SIGTERM"), publish_folder(tmp_path / "out") as tmp:
        (tmp / "half").write_text("half")
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # not reached: the handler raises at once
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    assert list(tmp_path.iterdir()) == []


def test_a_programs_own_sigterm_handler_and_other_threads_are_left_alone(tmp_path):
    calls = []

    def own(signum, frame):
        calls.append(signum)

    previous = signal.signal(signal.SIGTERM, own)
    try:
        with publish_folder(tmp_path / "a") as tmp:
            assert signal.getsignal(signal.SIGTERM) is own
            os.kill(os.getpid(), signal.SIGTERM)
            (tmp / "x").write_text("x")
        assert calls == [signal.SIGTERM] and (tmp_path / "a" / "x").is_file()
    finally:
        signal.signal(signal.SIGTERM, previous)
    seen = []

    def write() -> None:
        with publish_folder(tmp_path / "b") as tmp:
            seen.append(signal.getsignal(signal.SIGTERM))
            (tmp / "y").write_text("y")

    thread = threading.Thread(target=write)
    thread.start()
    thread.join()
    assert seen == [signal.SIG_DFL] and (tmp_path / "b" / "y").is_file()


def test_sigterm_during_the_swap_is_held_until_the_output_is_in_place(tmp_path):
    """A SIGTERM between moving the old output aside and moving the new one in would leave neither at the path: it
    is held back until the swap is done, then the process ends by it (the default handler, restored)."""
    script = tmp_path / "swap.py"
    script.write_text(
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from lightning_merge.io import output\n"
        "real = os.replace\n"
        "def replace(src, dst):\n"
        "    real(src, dst)\n"
        "    if '-old-' in str(dst):\n"
        "        os.kill(os.getpid(), signal.SIGTERM)  # right after the old output is moved aside\n"
        "output.os.replace = replace\n"
        "out = Path(sys.argv[1])\n"
        "with output.publish_folder(out) as tmp:\n"
        "    (tmp / 'w').write_text('new')\n"
        "print('not reached: the held SIGTERM ends the process once the handler is restored')\n"
    )
    out = tmp_path / "out"
    out.mkdir()
    (out / "w").write_text("old")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, str(script), str(out)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == -signal.SIGTERM and "not reached" not in done.stdout, done.stderr
    assert (out / "w").read_text() == "new" and hidden(out) == []
