"""Mixed precision of the trainer's one step (``train.precision``).

bf16 and fp16 run the step's forward, task loss and strategy loss, and evaluation, under
``torch.autocast``; parameters, gradients and the optimizer stay fp32, so strategies need no change.
fp16's narrow range needs a gradient scaler: the loss is scaled before backward and the gradients
unscaled right after, before any ``after_backward`` hook reads or edits them (GEM, A-GEM, HAT,
PackNet see true gradients). A step whose gradients overflowed is skipped whole, hooks included,
and the scale shrinks. fp32 enters no context and calls ``loss.backward()`` and ``optimizer.step()``
as before. torch >= 2.3 runs all three on CPU as well (autocast and ``GradScaler("cpu")``).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import Tensor

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    def __init__(self, precision: str, device: torch.device):
        self.dtype = DTYPES[precision]
        self.device_type = device.type
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

    def autocast(self) -> AbstractContextManager:
        return nullcontext() if self.dtype is None else torch.autocast(self.device_type, dtype=self.dtype)

    def backward(self, loss: Tensor) -> None:
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def unscale(self, optimizer: torch.optim.Optimizer) -> bool:
        """Gradients back at their true size; False when they overflowed (the step is then skipped:
        call ``skip``)."""
        if self.scaler is None:
            return True
        self.scaler.unscale_(optimizer)
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()) if grads else True

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is None:
            optimizer.step()
            return
        self.scaler.step(optimizer)
        self.scaler.update()

    def skip(self) -> None:
        """An overflowed step: no update, a smaller scale for the next."""
        self.scaler.update()

    def state_dict(self) -> dict[str, Any]:
        """The scaler's state (a resumed fp16 trial continues with the same scale); empty otherwise."""
        return self.scaler.state_dict() if self.scaler is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)
