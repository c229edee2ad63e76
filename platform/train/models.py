"""Networks: a backbone that maps inputs to features, and a head that maps features to class scores.

Every model answers ``model(x, t)`` with scores over the stream's whole label space [B, classes]:
in task-IL the trainer masks them to the classes of each sample's task ``t``. With
``heads: multi`` each task has its own linear head (its scores are placed at its classes).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

MASKED = -1e9  # score of a class outside a sample's task (finite, so distillation stays NaN-free)


class ModelSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Literal["mlp", "cnn", "resnet18"] = "mlp"
    hidden: list[int] = Field([400, 400], description="mlp: hidden layer widths; [] is the linear model (no hidden layer)")
    channels: list[int] = Field([32, 64], min_length=1, description="cnn: channels of each conv block")
    heads: Literal["shared", "multi"] = Field(
        "shared", description="task-il: one shared output layer (masked to the task's classes) or one head per task"
    )


class MLP(nn.Module):
    """Flatten, then Linear+ReLU per hidden width; with no width, the flattened input (the head
    on it is then the linear model)."""

    def __init__(self, in_features: int, hidden: list[int]):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        for width in hidden:
            layers += [nn.Linear(in_features, width), nn.ReLU()]
            in_features = width
        self.layers = nn.Sequential(*layers)
        self.out_features = in_features

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class SmallCNN(nn.Module):
    """Conv-ReLU-MaxPool blocks, then global average pooling."""

    def __init__(self, in_channels: int, channels: list[int]):
        super().__init__()
        blocks: list[nn.Module] = []
        for c in channels:
            blocks += [nn.Conv2d(in_channels, c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True)]
            in_channels = c
        self.layers = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out_features = in_channels

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


def cifar_resnet18(in_channels: int) -> nn.Module:
    """torchvision's ResNet-18 with the CIFAR stem (3x3 stride-1 first conv, no max-pool)."""
    from torchvision.models import resnet18

    net = resnet18(num_classes=10)
    net.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    net.fc = nn.Identity()
    net.out_features = 512
    return net


class MultiHead(nn.Module):
    """One linear head per task; each sample gets its task head's scores at that task's classes.

    Every head runs on the whole batch and ``torch.where`` picks per sample: no data-dependent
    control flow, so per-sample gradients work through it.
    """

    def __init__(self, in_features: int, task_classes: list[tuple[int, ...]], num_classes: int):
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(in_features, len(c)) for c in task_classes)
        self.task_classes = [list(c) for c in task_classes]
        self.num_classes = num_classes

    def forward(self, features: Tensor, t: Tensor) -> Tensor:
        out = features.new_full((features.shape[0], self.num_classes), MASKED, dtype=torch.float32)
        for task, (head, classes) in enumerate(zip(self.heads, self.task_classes)):
            cols = torch.tensor(classes, device=features.device)
            mine = (t == task).unsqueeze(1)
            out = out.index_copy(1, cols, torch.where(mine, head(features).float(), out.index_select(1, cols)))
        return out


class CLModel(nn.Module):
    """backbone -> head; ``features(x)`` exposes the representation (iCaRL, SSL, distillation) and
    ``scores(features, t)`` the head, so one backbone pass can be scored under several task ids."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def features(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    def scores(self, features: Tensor, t: Tensor | None = None) -> Tensor:
        """Class scores in fp32 also under autocast: strategies mask, compare and store them as in fp32."""
        return (self.head(features, t) if isinstance(self.head, MultiHead) else self.head(features)).float()

    def forward(self, x: Tensor, t: Tensor | None = None) -> Tensor:
        return self.scores(self.backbone(x), t)


def build_model(spec: ModelSpec, input_shape: tuple[int, int, int], num_classes: int,
                task_classes: list[tuple[int, ...]], scenario: str) -> CLModel:
    """The spec's network for a stream; parameters drawn from torch's global RNG (seed it first)."""
    if spec.name == "mlp":
        backbone: nn.Module = MLP(math.prod(input_shape), spec.hidden)
    elif spec.name == "cnn":
        backbone = SmallCNN(input_shape[0], spec.channels)
    else:
        backbone = cifar_resnet18(input_shape[0])
    width = backbone.out_features
    if scenario == "task-il" and spec.heads == "multi":
        return CLModel(backbone, MultiHead(width, task_classes, num_classes))
    return CLModel(backbone, nn.Linear(width, num_classes))


def uses_channels_last(spec: ModelSpec, device: torch.device) -> bool:
    """Convolutional models on CUDA keep their weights channels_last (NHWC): cuDNN then runs the
    convolutions in that layout, faster on tensor cores. On CPU they stay contiguous: the kernels
    differ and the accuracy matrices would not be guaranteed to stay the same."""
    return device.type == "cuda" and spec.name in ("cnn", "resnet18")


def place_model(model: nn.Module, spec: ModelSpec, device: torch.device) -> nn.Module:
    """The model on ``device``, in the memory format ``uses_channels_last`` picks."""
    if uses_channels_last(spec, device):
        return model.to(device, memory_format=torch.channels_last)
    return model.to(device)


def module_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers."""
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)
