"""Scenarios: cut a source's train and test tensors into the experiences of a stream.

- class-il / task-il: experience i holds the i-th group of classes; labels stay global class ids.
- domain-il split: the same class groups, labels are the position within the group (Hsu et al. 2018).
- domain-il permuted: every experience holds all the data under its own fixed pixel permutation.
- domain-il rotated: every experience holds all the data rotated by its own angle.
- class-il blurry: the split's class groups as home experiences, with leaks between them (blurry.py).

Every tensor is built once here, so training reads experiences without per-epoch work.
"""

from __future__ import annotations

import torch
from torch import Tensor

from clgrid.benchmarks import BenchmarkSpec, Experience, Stream
from clgrid.benchmarks.blurry import blurry_train
from clgrid.benchmarks.sources import NUM_CLASSES, load_source

# Rotating a whole source at once would allocate a sampling grid as large as the data; chunks bound it.
_ROTATE_CHUNK = 8192
# Offset of the validation split's generator from the trial seed (a prime, far from the +1, +2...
# offsets of the strategy's and probes' generators).
_VALIDATION_SEED = 15_485_863


def load_stream(spec: BenchmarkSpec, seed: int) -> Stream:
    """The stream of a benchmark for one trial: a pure function of the spec and the seed. The
    validation split is held out of the source's training data first; its experiences are cut
    like the test set's (a blurry stream's val[j]: the classes whose home is j)."""
    train_x, train_y, test_x, test_y = load_source(spec.source, spec.data_root, spec.download)
    input_shape = tuple(train_x.shape[1:])
    if spec.validation:
        held = validation_mask(spec, seed, train_y)
        val_x, val_y, train_x, train_y = train_x[held], train_y[held], train_x[~held], train_y[~held]
    if spec.splits_classes:
        groups = class_groups(spec, seed)
        relabel = spec.scenario == "domain-il"

        def cut(x: Tensor, y: Tensor) -> list[Experience]:
            return _split_by_class(x, y, groups, relabel)

        train = blurry_train(spec, seed, train_x, train_y, groups) if spec.blurry else cut(train_x, train_y)
        num_classes = len(groups[0]) if relabel else NUM_CLASSES[spec.source]
    else:
        transforms = _domain_transforms(spec, seed, input_shape)

        def cut(x: Tensor, y: Tensor) -> list[Experience]:
            # labels are cloned so no experience aliases the per-process cached source tensors
            return [Experience(i, t(x), y.clone(), _all(spec)) for i, t in enumerate(transforms)]

        train = cut(train_x, train_y)
        num_classes = NUM_CLASSES[spec.source]
    return Stream(
        name=spec.id,
        scenario=spec.scenario,
        input_shape=input_shape,
        num_classes=num_classes,
        train=train,
        test=cut(test_x, test_y),
        val=cut(val_x, val_y) if spec.validation else [],
    )


def class_groups(spec: BenchmarkSpec, seed: int) -> list[tuple[int, ...]]:
    """The classes of each experience: the class order cut into ``spec.experiences`` equal groups."""
    num_classes = NUM_CLASSES[spec.source]
    if spec.order_per_seed:
        order = torch.randperm(num_classes, generator=torch.Generator().manual_seed(seed)).tolist()
    elif spec.class_order is not None:
        order = list(spec.class_order)
    else:
        order = list(range(num_classes))
    size = num_classes // spec.experiences
    return [tuple(order[i : i + size]) for i in range(0, num_classes, size)]


def class_order(spec: BenchmarkSpec, seed: int) -> list[list[int]] | None:
    """The class order a trial runs, as its experiences' classes (None for streams whose experiences
    all hold every class: permuted, rotated); recorded in result.json and on the MLflow run."""
    return [list(group) for group in class_groups(spec, seed)] if spec.splits_classes else None


def validation_mask(spec: BenchmarkSpec, seed: int, y: Tensor) -> Tensor:
    """Which rows of the source's training data form the validation split: of every class,
    round(validation x its count), drawn by a generator of its own (off the streams the trial seed
    drives elsewhere). Split and domain experiences hold each of their classes whole, so this is
    also per class within each experience."""
    generator = torch.Generator().manual_seed(seed + _VALIDATION_SEED)
    held = torch.zeros(len(y), dtype=torch.bool)
    for c in range(NUM_CLASSES[spec.source]):
        rows = (y == c).nonzero().squeeze(1)
        count = round(spec.validation * len(rows))
        if count == 0 and len(rows):
            raise ValueError(f"benchmark {spec.id}: validation {spec.validation} holds out no sample of class {c} "
                             f"({len(rows)} training samples); use a larger fraction, or 0 for no validation split")
        held[rows[torch.randperm(len(rows), generator=generator)[:count]]] = True
    return held


def _split_by_class(x: Tensor, y: Tensor, groups: list[tuple[int, ...]], relabel: bool) -> list[Experience]:
    experiences = []
    num_classes = sum(len(group) for group in groups)  # the groups partition all the classes
    for index, group in enumerate(groups):
        group_ids = torch.tensor(group)
        mask = torch.isin(y, group_ids)
        labels = y[mask]
        if relabel:
            position = torch.zeros(num_classes, dtype=torch.int64)
            position[group_ids] = torch.arange(len(group))
            labels, group = position[labels], tuple(range(len(group)))
        experiences.append(Experience(index, x[mask].contiguous(), labels.contiguous(), group))
    return experiences


def _all(spec: BenchmarkSpec) -> tuple[int, ...]:
    return tuple(range(NUM_CLASSES[spec.source]))


def _domain_transforms(spec: BenchmarkSpec, seed: int, input_shape: tuple[int, ...]) -> list:
    """One input transform per experience of a permuted or rotated stream."""
    if spec.domain == "permuted":
        height, width = input_shape[1:]
        generator = torch.Generator().manual_seed(seed if spec.permutation_seed is None else spec.permutation_seed)
        permutations = [torch.randperm(height * width, generator=generator) for _ in range(spec.experiences)]
        return [_permuter(p) for p in permutations]
    # Evenly spaced angles from 0 (the original images) to max_rotation (the last experience).
    step = spec.max_rotation / (spec.experiences - 1) if spec.experiences > 1 else 0.0
    return [_rotator(i * step) for i in range(spec.experiences)]


def _permuter(permutation: Tensor):
    def permute(x: Tensor) -> Tensor:
        # The same pixel positions move in every channel, so a pixel's colour stays together.
        flat = x.flatten(start_dim=2)[:, :, permutation]
        return flat.reshape(x.shape).contiguous()

    return permute


def _rotator(angle: float):
    # imported here: torchvision pulls in torch._dynamo, seconds of start-up for every process that
    # imports clgrid.spec (the CLI, every Ray worker) when no stream is rotated
    from torchvision.transforms.functional import InterpolationMode, rotate

    def rotate_all(x: Tensor) -> Tensor:
        chunks = [
            rotate(chunk, angle, interpolation=InterpolationMode.BILINEAR) for chunk in x.split(_ROTATE_CHUNK)
        ]
        return torch.cat(chunks).clamp_(0.0, 1.0).contiguous()

    return rotate_all
