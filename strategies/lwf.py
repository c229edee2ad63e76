"""Learning without Forgetting (Li & Hoiem 2017).

Before each experience the model is frozen as a teacher; training adds alpha * T^2 * KL(teacher || student)
on the new samples' temperature-softened scores over the earlier experiences' classes. Task-IL
distills every earlier task's head (one term per head, summed): both networks score the batch as if
it came from that task. In class-IL, ``distill: padded`` (van de Ven et al. 2022) takes the student's
softmax over every class seen so far, the new ones included, against the teacher's padded with
probability 0 on the new classes: the student is also pulled away from putting old samples in new
classes, which ``old`` (a softmax over the old classes alone) cannot see.
"""

import copy
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from clgrid.strategies.base import Batch, Context, Strategy, StrategyConfig


class LwFConfig(StrategyConfig):
    """``alpha`` 0.5 (of 0.5, 1, 2) is chosen on the validation split: the best mean val_acc over
    split-mnist5k task-IL and permuted-mnist5k domain-IL, 2 tuning seeds, MLP 400x400, 100 iterations
    of batch 128 per experience (docs/tuning.md "Defaults", with the spec that ran it);
    it replaced 1.0, chosen on test accuracy in an earlier release. ``temperature`` 2 was not tuned
    (Hinton et al. 2015's and Li & Hoiem's usual value)."""

    name: Literal["lwf"] = "lwf"
    alpha: float = Field(0.5, ge=0, description="weight of the distillation loss")
    temperature: float = Field(2.0, gt=0, description="softens both networks' scores")
    distill: Literal["old", "padded"] = Field(
        "old", description="class-IL: softmax over the old classes only (old), or the student's over all "
                           "classes seen so far against the teacher's padded with zeros on the new ones "
                           "(padded, van de Ven et al. 2022)")


def distillation(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """KL(teacher || student) of the softened scores, mean over samples; T^2 keeps the gradient's
    scale independent of T (Hinton et al. 2015). Zero when the two agree."""
    log_p_student = F.log_softmax(student / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher / temperature, dim=1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return temperature**2 * kl


def padded_distillation(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """KL(teacher padded with probability 0 on the student's extra, trailing columns || student),
    mean over samples, times T^2. The padded entries add nothing to the sum (0 log 0 = 0), so only
    the teacher's columns are summed; the student's softmax still spans all of its columns."""
    log_p_student = F.log_softmax(student / temperature, dim=1)[:, : teacher.shape[1]]
    log_p_teacher = F.log_softmax(teacher / temperature, dim=1)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim=1).mean()
    return temperature**2 * kl


class LwF(Strategy):
    Config = LwFConfig

    def __init__(self, config: LwFConfig):
        super().__init__(config)
        self.teacher: nn.Module | None = None

    def before_experience(self, ctx: Context) -> None:
        # Needs no checkpointed state: on resume the restored model is the teacher again.
        if ctx.experience_index == 0:
            return
        self.teacher = copy.deepcopy(ctx.model).eval().requires_grad_(False)

    def loss(self, batch: Batch, output: Tensor, ctx: Context) -> Tensor | None:
        if self.teacher is None:
            return None
        old = ctx.seen[:-1]
        if ctx.scenario == "task-il":
            # each earlier task's head, on the batch scored as if it came from that task; one
            # backbone pass per network, however many heads
            features = ctx.model.features(batch.x)
            with torch.no_grad():
                teacher_features = self.teacher.features(batch.x)
            total = output.new_zeros(())
            for e in old:
                t, classes = torch.full_like(batch.t, e.index), list(e.classes)
                with torch.no_grad():
                    teacher = self.teacher.scores(teacher_features, t)[:, classes]
                student = ctx.model.scores(features, t)[:, classes]
                total = total + distillation(student, teacher, self.config.temperature)
            return self.config.alpha * total
        classes = sorted({c for e in old for c in e.classes})
        with torch.no_grad():
            teacher = self.teacher(batch.x, batch.t)[:, classes]
        if self.config.distill == "padded":  # the old classes first: the teacher's columns, then the new ones
            new = sorted({c for e in ctx.seen for c in e.classes} - set(classes))
            return self.config.alpha * padded_distillation(output[:, classes + new], teacher, self.config.temperature)
        return self.config.alpha * distillation(output[:, classes], teacher, self.config.temperature)
