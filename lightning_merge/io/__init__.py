"""Checkpoint I/O: lazy sources over every checkpoint format, and a streaming safetensors writer.

Never imports Lightning: a ``.ckpt`` is read as the state dict inside it.
"""

from lightning_merge.io.sources import (
    CheckpointSource,
    HFFolderSource,
    PrefixedSource,
    SafetensorsSource,
    StateDictSource,
    TorchFileSource,
    open_source,
    source_files,
)
from lightning_merge.io.writer import (
    SafetensorsWriter,
    TensorSpec,
    replace_folder_atomically,
    save_state_dict,
    write_stream,
)

__all__ = [
    "CheckpointSource",
    "HFFolderSource",
    "PrefixedSource",
    "SafetensorsSource",
    "SafetensorsWriter",
    "StateDictSource",
    "TensorSpec",
    "TorchFileSource",
    "open_source",
    "replace_folder_atomically",
    "save_state_dict",
    "source_files",
    "write_stream",
]
