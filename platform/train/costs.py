"""Compute and storage meters of a trial.

Training FLOPs come from torch's FLOP counter on real batches, not from a formula: the first
``measured_steps`` steps of every training phase (an experience, or a ``ctx.fit`` call) run under
``FlopCounterMode``; each later step adds the measured FLOPs per input sample times its samples:

    train_flops = sum_phases (measured_flops / measured_samples) * samples_in_phase

The rate includes whatever a strategy adds to a step (replayed samples, extra forward passes,
gradient projections), because it is measured on the whole step. Work outside steps (for example
an EWC Fisher pass in ``after_experience``) is counted in full under the counter.

device_seconds = train_seconds x the trial's device share (GPU fraction on a GPU, else CPUs):
the resource-seconds a cluster bills for the training.
"""

from __future__ import annotations

import resource
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Iterator

import torch
from torch.utils.flop_counter import FlopCounterMode


@dataclass
class Costs:
    train_flops: float = 0.0
    train_seconds: float = 0.0
    device_seconds: float = 0.0
    samples_seen: int = 0
    peak_memory_bytes: int = 0
    replay_bytes: int = 0
    model_bytes: int = 0
    strategy_state_bytes: int = 0

    def as_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}


class FlopMeter:
    """Counts training FLOPs by measuring a few steps per phase and scaling by samples."""

    def __init__(self, measured_steps: int = 2, enabled: bool = True):
        self.measured_steps = measured_steps
        self.enabled = enabled
        self.total = 0.0
        self._mode: FlopCounterMode | None = None  # the counter of an open `counting()` block

    def phase(self) -> "Phase":
        return Phase(self)

    @contextmanager
    def counting(self) -> Iterator[None]:
        """Counts everything inside in full (nested phases pause it to avoid double counting)."""
        if not self.enabled or self._mode is not None:
            yield
            return
        self._open()
        try:
            yield
        finally:
            self._close()

    @contextmanager
    def _paused(self) -> Iterator[None]:
        if self._mode is None:
            yield
            return
        self._close()
        try:
            yield
        finally:
            self._open()

    def _open(self) -> None:
        self._mode = FlopCounterMode(display=False)
        self._mode.__enter__()

    def _close(self) -> None:
        mode, self._mode = self._mode, None
        mode.__exit__(None, None, None)
        self.total += mode.get_total_flops()


class Phase:
    """One training phase: steps over batches of one data set with one model shape."""

    def __init__(self, meter: FlopMeter):
        self.meter = meter
        self.measured = 0
        self.flops = 0.0
        self.samples = 0

    @contextmanager
    def step(self, n_samples: int) -> Iterator[None]:
        meter = self.meter
        if not meter.enabled:
            yield
            return
        with meter._paused():
            if self.measured < meter.measured_steps:
                with FlopCounterMode(display=False) as mode:
                    yield
                flops = mode.get_total_flops()
                self.flops += flops
                self.samples += n_samples
                self.measured += 1
                meter.total += flops
            else:
                yield
                meter.total += self.flops / max(self.samples, 1) * n_samples


class Stopwatch:
    """Accumulates wall seconds over the blocks it times (synchronising CUDA so GPU work counts)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds = 0.0

    @contextmanager
    def timing(self) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.seconds += time.perf_counter() - start


def reset_peak_memory(device: torch.device) -> None:
    """Starts a new peak for ``peak_memory_bytes``: Ray reuses a worker process for several trials,
    and the earlier trials' peak must not count toward this one's."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif sys.platform.startswith("linux"):
        try:  # "5" resets the process's high-water mark (VmHWM, ru_maxrss) to its current RSS
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass  # not permitted here: the peak then covers the worker's whole life


def peak_memory_bytes(device: torch.device) -> int:
    """Peak device memory on a GPU; on CPU, the process's peak resident set size. Both since the
    last ``reset_peak_memory`` (on Linux; elsewhere, on CPU, since the process started)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # Linux reports KiB


def tensor_bytes(obj: object) -> int:
    """Bytes of every tensor inside nested dicts/lists/tuples."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0
