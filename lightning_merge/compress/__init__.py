"""TSV-C, Task Singular Vectors Compress (Gargiulo et al., CVPR 2025, arXiv:2412.00081): each fine-tune kept as a
small low-rank update of the base, loadable as a peft LoRA adapter, so that tasks are switched by swapping updates.

Per matrix parameter ``W_t ~ W0 + U_k diag(s_k) V_k^T`` (:func:`lightning_merge.functional.tsv_c`, the best rank-``k``
approximation of the task matrix), the other parameters' deltas whole. Three modules:
:mod:`~lightning_merge.compress.method` (the :class:`TSVC` options and the task names),
:mod:`~lightning_merge.compress.layout` (the files of a task: a peft adapter and the compact form, and
:func:`load_compressed`) and :mod:`~lightning_merge.compress.checkpoints` (:func:`compress_checkpoints`, streamed key
by key like the merge). Never imports Lightning.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> base = {"layer.weight": torch.randn(16, 12, generator=g), "layer.bias": torch.zeros(16)}
    >>> tuned = {t: {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()} for t in ("a", "b")}
    >>> out = tempfile.mkdtemp() + "/compressed"
    >>> record = compress_checkpoints(base, tuned, out, rank=12, progress=False)  # k = r: lossless
    >>> sorted(p.name for p in Path(out, "a").iterdir())
    ['adapter_config.json', 'adapter_model.safetensors', 'tsv_c.safetensors']
    >>> w = load_compressed(Path(out, "a"), base)
    >>> torch.allclose(w["layer.weight"], tuned["a"]["layer.weight"], atol=1e-5), record.compression["ratio"] > 1
    (True, True)
"""

from lightning_merge.compress.checkpoints import CompressRecord, compress_checkpoints
from lightning_merge.compress.layout import COMPACT_FILE, CompressedTask, load_compressed, module_kind, write_task
from lightning_merge.compress.method import TSVC, check_task_names, default_task_names

__all__ = [
    "COMPACT_FILE",
    "TSVC",
    "CompressRecord",
    "CompressedTask",
    "check_task_names",
    "compress_checkpoints",
    "default_task_names",
    "load_compressed",
    "module_kind",
    "write_task",
]
