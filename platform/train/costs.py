"""Compute and storage meters of a trial.

Training FLOPs, the rule: what a training step computes per trained sample, times the samples
trained. A trained sample is a row of any forward pass of ``ctx.model`` that feeds the step's loss
(new samples, replayed ones in the batch, DER's memory batches); a step whose loss does not go
through ``ctx.model``'s forward (a generator's fit, a features-only loss) counts its batch. The first
``measured_steps`` steps of every training phase (an experience, or a ``ctx.fit`` call) run under
a counting dispatch mode with torch's FLOP formulas (``_Counter``); every later step adds that
phase's measured FLOPs per trained sample times its own trained samples:

    train_flops = sum_phases (measured_flops / measured_samples) * trained_samples_in_phase
                  + the work outside steps (``after_experience``, ``before_experience``), in full

A phase's rate is measured on its own steps, so replayed batches, extra forward passes and
gradient projections are in it at the size they have in that phase. Counted: matrix products and
convolutions (torch's counter, 2 FLOPs per multiply-add), matrix-vector and dot products (GEM's and
A-GEM's constraints and projections, added to the counter here), and analytic counts passed to
``count_flops`` for work the counter cannot see (the quadratic penalty of L2, EWC, SI and MAS;
iCaRL's herding). Not counted: elementwise arithmetic (activations, losses, normalisation, the
scale-and-subtract of a projection: well under 1% of a step of the MLP), optimizer arithmetic,
GEM's small dual QP (solved in numpy), evaluation and data movement.

device_seconds = train_seconds x the trial's device share (GPU fraction on a GPU, else CPUs):
the resource-seconds a cluster bills for the training.
"""

from __future__ import annotations

import functools
import resource
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import ContextManager, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry, shape_wrapper


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


def _mv_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * a_shape[0] * a_shape[1]


def _dot_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * a_shape[0]


# torch's formulas (matrix products, convolutions, attention) and what its counter leaves out that a
# strategy's step computes at the size of the model: matrix-vector and dot products
_FORMULAS = {**flop_registry, **{op: shape_wrapper(f) for op, f in (
    (torch.ops.aten.mv, _mv_flops), (torch.ops.aten.dot, _dot_flops), (torch.ops.aten.vdot, _dot_flops))}}
_open_counters: list["_Counter"] = []  # the counter measuring now (at most one: nested blocks pause)


def count_flops(flops: float) -> None:
    """Adds work the counter cannot see (elementwise arithmetic worth counting) to the block being
    measured; outside a measured block it is part of a measured rate already, or not counted."""
    if _open_counters:
        _open_counters[-1].analytic += flops


@functools.cache
def _decomposes(op: torch._ops.OpOverload) -> bool:
    """Whether ``op.decompose`` has a decomposition to run (a composite op seen by a dispatch mode)."""
    if op is torch.ops.prim.device.default:  # as FlopCounterMode: never decomposed
        return False
    key = torch._C.DispatchKey.CompositeImplicitAutograd
    return key in op.py_kernels or torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), key)


class _Counter(TorchDispatchMode):
    """Counts FLOPs of every op dispatched inside with torch's formulas (``_FORMULAS``), as
    ``FlopCounterMode`` does (the same totals: a test compares them), without its per-module
    breakdown, whose module hooks and per-op bookkeeping made a counted step of a small MLP 8x
    an uncounted one (this mode: 3x). ``count_flops`` adds to it."""

    def __init__(self) -> None:
        super().__init__()
        self.counted = 0
        self.analytic = 0.0

    def __enter__(self) -> "_Counter":
        super().__enter__()
        _open_counters.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        _open_counters.remove(self)
        super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        formula = _FORMULAS.get(func._overloadpacket)
        if formula is None and _decomposes(func):
            with self:  # a composite op is counted through the ops it decomposes into
                return func.decompose(*args, **kwargs)
        out = func(*args, **kwargs)
        if formula is not None:
            self.counted += formula(*args, **kwargs, out_val=out)
        return out

    @property
    def total(self) -> float:
        return self.counted + self.analytic


class FlopMeter:
    """Counts training FLOPs by measuring a few steps per phase and scaling by trained samples."""

    def __init__(self, measured_steps: int = 2, enabled: bool = True):
        self.measured_steps = measured_steps
        self.enabled = enabled
        self.total = 0.0
        self._counter: _Counter | None = None  # the counter of an open `counting()` block

    def phase(self) -> "Phase":
        return Phase(self)

    @contextmanager
    def counting(self) -> Iterator[None]:
        """Counts everything inside in full (nested phases pause it to avoid double counting)."""
        if not self.enabled or self._counter is not None:
            yield
            return
        self._open()
        try:
            yield
        finally:
            self._close()

    @contextmanager
    def _paused(self) -> Iterator[None]:
        if self._counter is None:
            yield
            return
        self._close()
        try:
            yield
        finally:
            self._open()

    def _open(self) -> None:
        self._counter = _Counter().__enter__()

    def _close(self) -> None:
        counter, self._counter = self._counter, None
        counter.__exit__(None, None, None)
        self.total += counter.total


class Step:
    """One training step; the trainer sets ``samples`` to the samples it trained."""

    samples = 0


class Phase:
    """One training phase: steps over batches of one data set with one model shape."""

    def __init__(self, meter: FlopMeter):
        self.meter = meter
        self.measured = 0
        self.flops = 0.0
        self.samples = 0

    @contextmanager
    def step(self) -> Iterator[Step]:
        meter, step = self.meter, Step()
        if not meter.enabled:
            yield step
            return
        with meter._paused():
            if self.measured < meter.measured_steps:
                with _Counter() as counter:
                    yield step
                meter.total += counter.total
                if step.samples:  # a skipped step (no batch to train) measures nothing
                    self.flops += counter.total
                    self.samples += step.samples
                    self.measured += 1
            else:
                yield step
                meter.total += self.flops / max(self.samples, 1) * step.samples


class ForwardRows:
    """Rows of every forward pass of ``model`` with autograd on (the trained samples of a step,
    read before and after its loss is computed)."""

    def __init__(self, model: torch.nn.Module):
        self.rows = 0
        self._handle = model.register_forward_pre_hook(self._count)

    def _count(self, module: torch.nn.Module, args: tuple) -> None:
        if torch.is_grad_enabled() and args and isinstance(args[0], torch.Tensor):
            self.rows += len(args[0])

    def close(self) -> None:
        self._handle.remove()


class Stopwatch:
    """Accumulates wall seconds over the blocks it times (synchronising CUDA so GPU work counts)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds = 0.0

    def timing(self) -> ContextManager[None]:
        """The time spent in the block is counted."""
        return self._adding(+1)

    def paused(self) -> ContextManager[None]:
        """Inside a timed block: the time spent here is not counted (continual evaluation)."""
        return self._adding(-1)

    @contextmanager
    def _adding(self, sign: int) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.seconds += sign * (time.perf_counter() - start)


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
