"""Host data to the device without stalling the step in flight.

A copy from ordinary (pageable) host memory to a GPU synchronises the stream first, so
the host would wait for every step already queued: the next step could not be prepared
while the device runs the one before. ``to_device`` stages through pinned memory and
queues the copy instead (PyTorch's pinned-memory cache keeps the staging buffer until the
copy has run).
"""

from __future__ import annotations

from typing import Sequence, Union

import numpy as np
import torch

HostData = Union[np.ndarray, torch.Tensor, Sequence[int]]


def to_device(data: HostData, device: torch.device) -> torch.Tensor:
    """A device copy of ``data`` (a numpy array, a CPU tensor or a list of ints), queued
    on the current stream. On the CPU: a new tensor (arrays unpickled from Ray are read-only)."""
    if not isinstance(data, torch.Tensor):
        data = torch.from_numpy(np.array(data))
    if device.type != "cuda":
        return data.to(device, copy=True)
    staged = torch.empty(data.shape, dtype=data.dtype, pin_memory=True)
    staged.copy_(data)
    return staged.to(device, non_blocking=True)
