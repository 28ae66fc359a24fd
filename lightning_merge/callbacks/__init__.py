"""Lightning callbacks of lightning-merge."""

from lightning_merge.callbacks.merge import MergeCallback

__all__ = ["MergeCallback"]
