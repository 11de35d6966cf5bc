"""Files -> augmented clips on the device: DALI pipelines for Kinetics videos and SSv2 frame folders.

    loader = build_loader(cfg.data, "train", batch_size=8, rank=rank, world_size=world, device_id=local_rank)
    for batch in loader:  # one epoch
        batch.clips, batch.labels, batch.index

The names below are imported on first use: DALI's worker processes unpickle `pipelines.sources.ClipSource`,
which imports this package, and should not pay for importing torch (seconds per worker).
"""
import importlib

_EXPORTS = {
    "Batch": "pipelines.loader", "ClipLoader": "pipelines.loader", "build_loader": "pipelines.loader",
    "VideoDataset": "pipelines.datasets", "VideoRecord": "pipelines.datasets", "read_dataset": "pipelines.datasets",
    "read_kinetics": "pipelines.datasets", "read_ssv2": "pipelines.datasets", "read_video_list": "pipelines.datasets",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'pipelines' has no attribute {name!r}")
