"""Checkpoint I/O: lazy sources over every checkpoint format, a streaming safetensors writer, and outputs.

:mod:`~lightning_merge.io.sources` reads checkpoints, :mod:`~lightning_merge.io.writer` writes safetensors,
:mod:`~lightning_merge.io.output` publishes output folders atomically (and checks them against the inputs),
:mod:`~lightning_merge.io.record` is the one ``merge_record.json`` schema, :mod:`~lightning_merge.io.hashing`
hashes the inputs for it and :mod:`~lightning_merge.io.hf` copies a Hugging Face folder's configuration and tokenizer
files into an output. Never imports Lightning: a ``.ckpt`` is read as the state dict inside it.
"""

from lightning_merge.io.hashing import HASHES, hash_file
from lightning_merge.io.hf import MODEL_FILES, copy_model_files, model_folder
from lightning_merge.io.output import check_output, publish_folder, stale_temporaries
from lightning_merge.io.record import RECORD_FILE, MergeRecord, describe_input
from lightning_merge.io.sources import (
    CheckpointSource,
    HFFolderSource,
    PrefixedSource,
    SafetensorsSource,
    StateDictSource,
    TorchFileSource,
    open_source,
)
from lightning_merge.io.writer import (
    SafetensorsWriter,
    TensorSpec,
    save_state_dict,
    write_stream,
)

__all__ = [
    "HASHES",
    "MODEL_FILES",
    "RECORD_FILE",
    "CheckpointSource",
    "HFFolderSource",
    "MergeRecord",
    "PrefixedSource",
    "SafetensorsSource",
    "SafetensorsWriter",
    "StateDictSource",
    "TensorSpec",
    "TorchFileSource",
    "check_output",
    "copy_model_files",
    "describe_input",
    "hash_file",
    "model_folder",
    "open_source",
    "publish_folder",
    "save_state_dict",
    "stale_temporaries",
    "write_stream",
]
