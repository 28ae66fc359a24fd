"""Merging in many processes on ``torch.distributed``: the launch, the agreement after each step, the watchdog.

This stage owns what a merge in ``N`` processes (``torchrun``, SLURM) needs beyond one process:

* :func:`launch_from_env` reads a launched run from the environment (``WORLD_SIZE``/``RANK``/``LOCAL_RANK`` as
  ``torchrun`` sets them, else ``SLURM_STEP_NUM_TASKS``/``SLURM_PROCID``/``SLURM_LOCALID`` as ``srun`` sets them),
  and :func:`session` initialises the default process group when it is not yet (and destroys it after, if it made
  it) and gives each rank its device (``cuda`` means ``cuda:LOCAL_RANK``).
* :class:`Ranks` is this merge's view of the group. :meth:`Ranks.agree` runs one step on every rank and then
  exchanges each rank's error (or result), so that every rank leaves a step together: the failing rank with its own
  error, the others with a :class:`RankFailedError` that names the failing rank and repeats its message. A rank never
  waits at a collective that a failed peer will not reach.
* :meth:`Ranks.watched` runs the long step (the merge of each rank's share, with no collective of its own) under a
  watchdog thread, which all-reduces a status flag every :data:`POLL_S` seconds on a group of its own: a failure on
  any rank, or a rank that disappears (killed: its sockets close), interrupts the others' main threads (``SIGINT``,
  which wakes blocking waits) within about a second or after the tensor operation in progress, not at the end of
  their shares.

The group is always gloo (on CPU), whatever the device: the merged tensors never cross ranks (each rank writes its own
bytes into the output files, see :func:`~lightning_merge.engine.merge_checkpoints`), so the only messages are errors,
small objects and flags, for which NCCL would add a CUDA context per rank and nothing else. When a user's program
has initialised the default group already (with any backend), gloo subgroups of it carry these messages. Never
imports Lightning.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from lightning_merge.engine.stream import resolve_device

__all__ = ["POLL_S", "Launch", "RankFailedError", "Ranks", "all_gather_json", "launch_from_env", "session"]

T = TypeVar("T")
POLL_S = 0.25
STEP_TIMEOUT = datetime.timedelta(minutes=10)  # a step's collectives: longer than any step's skew between ranks
WATCH_TIMEOUT = datetime.timedelta(seconds=60)  # a watchdog all-reduce: the ranks poll in step, every POLL_S
_RUNNING, _DONE, _FAILED = 0, 1, 2


class RankFailedError(RuntimeError):
    """Another rank of the merge failed (its message is repeated) or was lost: this rank stopped too."""


@dataclasses.dataclass(frozen=True)
class Launch:
    """A launched run: this process's global rank, the number of processes and the rank on this host."""

    rank: int
    world_size: int
    local_rank: int


def _env_int(names: tuple[str, ...]) -> tuple[str, int] | None:
    for name in names:
        if (text := os.environ.get(name)) is not None:
            try:
                return name, int(text)
            except ValueError:
                raise ValueError(f"Expected the environment variable {name} to be an int, but got {text!r}.") from None
    return None


def launch_from_env() -> Launch | None:
    """The launch described by the environment, or ``None`` for one process.

    ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` (``torchrun``) win over ``SLURM_STEP_NUM_TASKS``, ``SLURM_PROCID``
    and ``SLURM_LOCALID``; a world of one process is ``None``. **(choice)** The size of the ``srun`` step, not of the
    allocation (``SLURM_NTASKS``): a batch script of ``--ntasks=8`` that runs ``lightning-merge`` itself, without
    ``srun``, is one process, not rank 0 of 8 waiting for peers that never start. Under SLURM, ``MASTER_ADDR`` and
    ``MASTER_PORT`` must be set too (the address of the first task's host, a free port), as for any
    ``torch.distributed`` program.

    Raises:
        ValueError: a variable that is not an int, a rank outside ``[0, world size)``, or (SLURM) no
            ``MASTER_ADDR``/``MASTER_PORT``.
    """
    world = _env_int(("WORLD_SIZE", "SLURM_STEP_NUM_TASKS"))
    if world is None or world[1] <= 1:
        return None
    rank = _env_int(("RANK",) if world[0] == "WORLD_SIZE" else ("SLURM_PROCID",))
    local = _env_int(("LOCAL_RANK",) if world[0] == "WORLD_SIZE" else ("SLURM_LOCALID",))
    if rank is None or not 0 <= rank[1] < world[1]:
        raise ValueError(
            f"Expected the environment to give this process's rank in [0, {world[1]}) ({world[0]}={world[1]}),"
            f" but got {rank and f'{rank[0]}={rank[1]}' or 'none'}."
        )
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    if missing:
        raise ValueError(
            f"Expected the environment variables {missing} to be set for a run of {world[1]} processes. HINT: under"
            " SLURM export MASTER_ADDR (the first task's host) and MASTER_PORT (a free port), or launch with torchrun."
        )
    return Launch(rank[1], world[1], local[1] if local is not None else 0)


@contextlib.contextmanager
def session(launch: Launch, device: torch.device | str | None) -> Iterator[torch.device]:
    """The default process group of ``launch`` (gloo, initialised here unless it already is, and then destroyed on
    exit) and this rank's device: ``cuda`` without an index is ``cuda:LOCAL_RANK``."""
    device = resolve_device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", launch.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    made = not dist.is_initialized()
    if made:
        dist.init_process_group("gloo", init_method="env://", rank=launch.rank, world_size=launch.world_size,
                                timeout=STEP_TIMEOUT)
    try:
        yield device
    finally:
        if made:
            dist.destroy_process_group()


def _one_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {' '.join(str(err).split())}"


def all_gather_json(value: Any, group: Any) -> list[Any]:
    """Every rank's JSON-serialisable ``value``, by rank: sent as UTF-8 JSON bytes, never pickled (unlike
    ``all_gather_object``, whose unpickling would run whatever a peer sent)."""
    data = torch.frombuffer(bytearray(json.dumps(value).encode()), dtype=torch.uint8)
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, torch.tensor([data.numel()]), group=group)
    longest = int(max(sizes).item())
    buffers = [torch.zeros(longest, dtype=torch.uint8) for _ in sizes]
    dist.all_gather(buffers, torch.cat([data, torch.zeros(longest - data.numel(), dtype=torch.uint8)]), group=group)
    return [json.loads(b[: int(n.item())].numpy().tobytes()) for b, n in zip(buffers, sizes, strict=True)]


class Ranks:
    """The ranks of the default process group, as one merge uses them; every rank makes the same calls in order."""

    def __init__(self) -> None:
        self.rank, self.world_size = dist.get_rank(), self.size()
        self._steps = dist.new_group(backend="gloo", timeout=STEP_TIMEOUT)
        self._watch = dist.new_group(backend="gloo", timeout=WATCH_TIMEOUT)

    @staticmethod
    def size() -> int:
        """The number of ranks of the default process group.

        Raises:
            ValueError: there is no initialised default process group.
        """
        if not dist.is_initialized():
            raise ValueError(
                "Expected an initialised torch.distributed default process group for a distributed merge, but there"
                " is none. HINT: launch with torchrun, or call torch.distributed.init_process_group first."
            )
        return dist.get_world_size()

    def close(self) -> None:
        """Free the groups this object made."""
        for group in (self._steps, self._watch):
            with contextlib.suppress(Exception):
                dist.destroy_process_group(group)

    def agree(self, work: Callable[[], tuple[T, Any]]) -> tuple[T, list[Any]]:
        """Run ``work`` here, which returns ``(kept, shared)``, then exchange every rank's outcome: ``kept`` and every
        rank's JSON-serialisable ``shared`` (by rank), or, if any rank failed, this rank's own error where it failed,
        else :class:`RankFailedError` naming the first rank that failed and its message."""
        kept: Any = None
        shared: Any = None
        error: Exception | None = None
        try:
            kept, shared = work()
        except Exception as err:  # every rank must reach the exchange, the failing one included
            error = err
        try:
            outcomes = all_gather_json([error is not None, _one_line(error) if error else shared], self._steps)
        except RuntimeError as lost:
            raise RankFailedError(f"lost contact with another rank ({_one_line(lost)[:300]})") from error
        if error is not None:
            raise error
        failed = [(rank, message) for rank, (bad, message) in enumerate(outcomes) if bad]
        if failed:
            raise RankFailedError(f"rank {failed[0][0]} failed: {failed[0][1]}")
        return kept, [value for _, value in outcomes]

    def watched(self, work: Callable[[], T]) -> T:
        """Run ``work`` (no collectives inside) while a watchdog stops this rank within about a second of any
        other rank's failure or loss, with :class:`RankFailedError`; this rank's own error is re-raised after the
        other ranks have heard of it. Every rank returns only once every rank has finished its ``work``."""
        dog = _Watchdog(self._watch, self.rank, self.world_size)
        try:
            with _interruptible(dog):
                result = work()
        except KeyboardInterrupt:
            if dog.peer_error is None:  # a real interrupt: tell the others, then stop
                dog.fail("KeyboardInterrupt: interrupted")
                raise
            dog.join()
            raise RankFailedError(dog.peer_error) from None
        except BaseException as err:
            dog.fail(_one_line(err))
            raise
        with contextlib.suppress(KeyboardInterrupt):  # an interrupt racing with our own finish: peer_error says
            dog.finish()
        if dog.peer_error is not None:
            raise RankFailedError(dog.peer_error)
        return result


@contextlib.contextmanager
def _interruptible(dog: _Watchdog) -> Iterator[None]:
    """Make the watchdog's ``SIGINT`` reach Python in the main thread while ``work`` runs.

    A process started in the background by a non-interactive shell (``torchrun ... &``, ``nohup``) inherits
    ``SIGINT`` ignored, and Python then installs no handler: the watchdog's signal did nothing and a busy rank
    worked on for minutes after a peer failed. **(choice)** While the work runs, an ignored ``SIGINT`` is replaced
    by a handler that raises only for the watchdog (a stray ``SIGINT`` stays ignored), and a default one (``SIG_DFL``,
    the process would die without clean-up) by one that raises ``KeyboardInterrupt``; the previous disposition is
    restored afterwards. Python's own handler, or the user's, is left alone.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    if previous not in (signal.SIG_IGN, signal.SIG_DFL):
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        if previous is signal.SIG_DFL or dog.peer_error is not None:
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class _Watchdog:
    """A thread that all-reduces this rank's status with the others' every :data:`POLL_S` seconds until every rank
    is done, and interrupts the main thread when another rank failed or was lost."""

    def __init__(self, group: Any, rank: int, world_size: int) -> None:
        self.group, self.rank, self.world_size = group, rank, world_size
        self.status, self.message = _RUNNING, ""
        self.peer_error: str | None = None
        self._lock = threading.Lock()
        self._main = threading.main_thread().ident
        self._thread = threading.Thread(target=self._run, name="lightning-merge-watchdog", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            with self._lock:
                state = torch.zeros(self.world_size, dtype=torch.int64)
                state[self.rank] = self.status
            try:
                dist.all_reduce(state, group=self.group)
            except RuntimeError as lost:
                self._stop_main(f"lost contact with another rank (killed, or its host down): {_one_line(lost)[:200]}")
                return
            failed = (state == _FAILED).nonzero().flatten().tolist()
            if failed:
                self._hear(failed[0])
                return
            if bool((state == _DONE).all()):
                return
            time.sleep(POLL_S)

    def _hear(self, source: int) -> None:
        try:
            message = all_gather_json(self.message, self.group)[source]
        except RuntimeError:
            message = "(its message was lost with it)"
        if source != self.rank:
            self._stop_main(f"rank {source} failed: {message}")

    def _stop_main(self, error: str) -> None:
        with self._lock:
            self.peer_error = error
            if self.status == _RUNNING and self._main is not None:
                signal.pthread_kill(self._main, signal.SIGINT)  # wakes a main thread blocked in a wait

    def fail(self, message: str) -> None:
        """Report this rank's failure to the others and wait (bounded) until they have its message."""
        with self._lock:
            self.status, self.message = _FAILED, message
        self.join()

    def finish(self) -> None:
        """Report this rank done; return once every rank is (or one failed)."""
        with self._lock:
            self.status = _DONE
        self.join()

    def join(self) -> None:
        self._thread.join(WATCH_TIMEOUT.total_seconds())
