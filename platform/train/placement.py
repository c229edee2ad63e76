"""Where a trial's tensors live while it trains (the GPU path).

On a GPU, copying every batch from host memory costs a transfer per step; a trial's stream is
usually small next to the device, so it goes there once: every train and test experience is copied
when the whole stream fits in ``resources.device_data_share`` of the trial's GPU memory (its
fraction of the device, or what is free now, whichever is less). Tensors a training phase brings
(joint's concatenation, task ids, a strategy's ``ctx.fit`` data) are copied once per phase by the
same rule. What does not fit stays on the host and each batch is gathered there, pinned and copied
without blocking. On CPU every tensor stays where it is, so CPU trials compute exactly what they did.

Strategies keep seeing the host tensors of ``ctx.stream``; only the trainer's batches and
evaluation read the device copies.
"""

from __future__ import annotations

import torch
from torch import Tensor

from clgrid.benchmarks import Stream


def fits_on_device(nbytes: int, free_bytes: int, total_bytes: int, gpu_fraction: float, share: float) -> bool:
    """Whether ``nbytes`` of data may live on the device: at most ``share`` of the trial's memory,
    which is its GPU fraction of the device (a whole GPU at most) and never more than is free."""
    return nbytes <= share * min(free_bytes, total_bytes * min(gpu_fraction, 1.0))


class DeviceData:
    """Device copies of the tensors that fit; ``rows`` and ``span`` hand out batches on the device."""

    def __init__(self, device: torch.device, stream: Stream, share: float, gpu_fraction: float):
        self.device, self.share, self.gpu_fraction = device, share, gpu_fraction
        self._copies: dict[int, tuple[Tensor, Tensor]] = {}  # id(host tensor) -> (host tensor, device copy)
        tensors = [t for exp in stream.train + stream.test for t in (exp.x, exp.y)]
        if self._fits(tensors):
            self._copies = {id(t): (t, t.to(device)) for t in tensors}

    @property
    def resident(self) -> bool:
        """Whether the stream lives on the device."""
        return bool(self._copies)

    def _fits(self, tensors: list[Tensor]) -> bool:
        if self.device.type != "cuda":
            return False
        free, total = torch.cuda.mem_get_info(self.device)
        return fits_on_device(sum(t.nbytes for t in tensors), free, total, self.gpu_fraction, self.share)

    def stage(self, *tensors: Tensor) -> list[Tensor]:
        """A training phase's tensors: their device copies, made now if they fit, else the host tensors."""
        staged = [self._copies[id(t)][1] if id(t) in self._copies else t for t in tensors]
        moving = [t for t in staged if t.device != self.device]
        if moving and self._fits(moving):
            staged = [t.to(self.device) for t in staged]
        return staged

    def rows(self, t: Tensor, idx: Tensor) -> Tensor:
        """Rows ``idx`` of ``t`` (a staged tensor) on the device."""
        if t.device == self.device:
            return t[idx.to(self.device)]
        if self.device.type != "cuda":
            return t[idx].to(self.device)
        return t[idx].pin_memory().to(self.device, non_blocking=True)

    def span(self, t: Tensor, start: int, stop: int) -> Tensor:
        """Rows ``start:stop`` of ``t`` (a stream tensor) on the device: the copy's when it has one."""
        source = self._copies[id(t)][1] if id(t) in self._copies else t
        return source[start:stop].to(self.device)
