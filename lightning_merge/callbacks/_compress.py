"""The ``compress`` option of :class:`~lightning_merge.callbacks.MergeCallback`: TSV-C of every task at the merge.

With ``compress`` set (a :class:`~lightning_merge.compress.TSVC`, or a mapping of its options such as
``{"rank": 0.1}``), the merge of full fine-tunes also writes each task's compressed update (Gargiulo et al., CVPR
2025: per matrix parameter the top-``k`` singular components of ``D_t = W_t - W0``, the other parameters' deltas
whole) with :func:`~lightning_merge.compress.compress_checkpoints`, from the same inputs as the merge (the base and
task sources, the same ``exclude``), in ``format="both"``, into ``dirpath/compressed``::

    compressed/<task>/     adapter_config.json + adapter_model.safetensors (a peft LoRA adapter), tsv_c.safetensors
    compressed/merge_record.json   the CompressRecord: options, inputs, per-task ranks and the compression ratio

``<task>`` is the task's safe file name (as for the heads). The compact form ``tsv_c.safetensors`` is keyed as in
the LightningModule (``load_compressed(folder, base)`` reads it back). The adapter is one of the model peft would
adapt: when the module holds one outermost ``transformers.PreTrainedModel`` (e.g. ``self.encoder``), its module
names are that model's own (``PeftModel.from_pretrained(<that model, pre-trained>, dirpath / "compressed" / task)``)
and linear, embedding and ``Conv1D`` modules are told apart from it; otherwise they are the LightningModule's.

Rank zero compresses (on the merge's device) while the other ranks wait; an error there is raised on every rank.
LoRA fits are refused when the fit starts: an adapter is already a low-rank update.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from lightning_merge.callbacks._distributed import RankedStrategy, raise_if_any_failed
from lightning_merge.callbacks._hf import find_pretrained_model
from lightning_merge.callbacks._tasks import safe_name
from lightning_merge.compress import TSVC, check_task_names, compress_checkpoints
from lightning_merge.io import CheckpointSource

COMPRESSED = "compressed"
Compress = TSVC | Mapping[str, Any] | None


def check_compress(compress: object, tasks: Sequence[str]) -> TSVC | None:
    """The ``compress`` argument as a :class:`~lightning_merge.compress.TSVC` (or ``None``), checked with the task
    folder names it will write.

    Raises:
        TypeError: neither ``None``, a ``TSVC`` nor a mapping. ValueError: an unknown or bad option, a bad name.
    """
    if compress is None:
        return None
    if isinstance(compress, Mapping):
        compress = TSVC.from_options(compress, "compress")
    if not isinstance(compress, TSVC):
        raise TypeError(
            "Expected argument `compress` to be None, a TSVC or a mapping of its options (e.g. {'rank': 0.1}), but"
            f" got {type(compress).__name__}."
        )
    check_task_names([safe_name(task) for task in tasks])
    return compress


def check_mode(compress: TSVC | None, mode: str | None) -> None:
    """Refuse ``compress`` for LoRA fits (``mode == "lora"``)."""
    if compress is not None and mode == "lora":
        raise ValueError(
            "Expected full fine-tunes with argument `compress` (TSV-C compresses each full task vector), but this is"
            " a LoRA fine-tune. HINT: a LoRA adapter is already a low-rank update of the base; drop `compress`."
        )


def _adapted_model(module: torch.nn.Module) -> tuple[str | None, torch.nn.Module]:
    """The key prefix of the Hugging Face model inside ``module`` (``None``: none) and the model the adapter is of."""
    found = find_pretrained_model(module)
    if found is None or not found[0]:
        return None, module if found is None else found[1]
    return f"{found[0]}.", found[1]


def save_compressed(strategy: RankedStrategy, compress: TSVC, folder: Path, base: CheckpointSource,
                    sources: Mapping[str, CheckpointSource], exclude: Sequence[str], module: torch.nn.Module,
                    device: torch.device, progress: bool) -> dict[str, Path]:
    """Rank zero writes every task's TSV-C update into ``folder`` (replacing it once complete); every rank then
    returns ``{task: folder / <task's safe name>}``."""
    error: BaseException | None = None
    if strategy.is_global_zero:
        prefix, model = _adapted_model(module)
        tasks = {safe_name(task): source for task, source in sources.items()}
        try:
            compress_checkpoints(base, tasks, folder, **compress.options(), exclude=exclude, format="both",
                                 overwrite=True, progress=progress, device=device, model=model, adapter_prefix=prefix)
        except Exception as err:  # re-raised below, after the other ranks have heard of it (none waits forever)
            error = err
    raise_if_any_failed(strategy, error)
    return {task: folder / safe_name(task) for task in sources}
