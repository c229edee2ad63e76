"""The pipeline spec's Pydantic models: what a spec may say, and the trial it resolves to.

A spec names benchmarks, strategies (each hyperparameter a value or a list: a list is a grid axis),
a model, training settings, seeds, resources, tracking, storage and report budgets. A strategy
entry's model is derived from the strategy's Config, so a hyperparameter is declared once, in its
strategy, and each of its values is validated here, once. The grid's arithmetic is in grid.py,
loading a spec from YAML in problems.py.
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, Tag, create_model, model_serializer, model_validator
from pydantic_core import PydanticUndefined

from clgrid.benchmarks import KEYS, BenchmarkSpec
from clgrid.spec import spaces
from clgrid.strategies import REGISTRY, StrategyConfig
from clgrid.sweep import layout
from clgrid.train.models import ModelSpec
from clgrid.train.continual import EvaluateSpec
from clgrid.train.probes import ProbesSpec

MAX_TRIALS_DEFAULT = 10_000
MAX_TRIALS_LIMIT = 1_000_000  # the largest max_trials a spec may ask for: beyond it no sweep is meant
_NO_CONTROL = r"^[^\x00-\x1f\x7f]+$"


class Strict(BaseModel):
    # inf or nan pass `gt=0` checks and would only fail once a trial trains
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class TrainSpec(Strict):
    """How each experience is trained. Give ``epochs`` or ``iterations`` (steps), not both."""

    epochs: int | None = Field(1, ge=1)
    iterations: int | None = Field(None, ge=1)
    batch_size: int = Field(128, ge=1)
    eval_batch_size: int = Field(1024, ge=1)
    optimizer: Literal["sgd", "adam"] = "adam"
    lr: float = Field(1e-3, gt=0)
    momentum: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="autocast of the training step and evaluation; fp16 adds a gradient scaler")
    online: bool = Field(False, description="one pass over each experience, every sample used once "
                                            "(give no epochs or iterations); docs/online.md")

    @model_serializer(mode="wrap")
    def _fp32_unsaid(self, handler: Any) -> dict[str, Any]:
        """fp32 is left out of dumps: trials that ask for no mixed precision keep the config and
        trial keys they had before it existed (a dump without it loads back as fp32)."""
        data = handler(self)
        if data.get("precision") == "fp32":
            del data["precision"]
        if data.get("online") is False:  # likewise for offline training
            del data["online"]
        return data

    @model_validator(mode="before")
    @classmethod
    def _one_budget(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("iterations") is not None:
            if data.get("epochs") is not None:
                raise ValueError("give either epochs or iterations per experience, not both")
            data = {**data, "epochs": None}
        return data

    @property
    def steps(self) -> dict[str, int | None]:
        return {"epochs": self.epochs, "iterations": self.iterations}


_LR = Annotated[float, Field(gt=0)]
_LRS = Annotated[Union[Annotated[_LR, Tag("value")], Annotated[list[_LR], Field(min_length=1), Tag("list")]],
                 Discriminator(lambda v: "list" if isinstance(v, list) else "value")]  # one error for a bad value


class TrainGrid(TrainSpec):
    """The spec's ``train``: ``lr`` may also be a list (a grid axis) or, under ``tune:``, a distribution."""

    lr: spaces.searchable("lr", float, _LR, _LRS) = Field(  # type: ignore[valid-type]
        1e-3, description="a value, a list (grid axis) or, under tune:, a distribution")

    def at(self, lr: float) -> TrainSpec:
        """The TrainSpec of one trial: this one with ``lr``."""
        return TrainSpec.model_validate({**self.model_dump(mode="json"), "lr": lr})

    @property
    def lrs(self) -> list[float] | None:
        """The grid axis of learning rates (a scalar is one); None for a distribution."""
        return None if isinstance(self.lr, spaces.Space) else self.lr if isinstance(self.lr, list) else [self.lr]


class TuneSpec(Strict):
    """Tune-then-test (docs/tuning.md): tuning trials on ``seeds`` scored on the validation split,
    then each strategy's best configuration on the spec's seeds, scored on test."""

    protocol: Literal["validation", "first-experiences"] = Field(
        "validation", description="validation: the whole stream scored on validation; first-experiences: only "
                                  "the first `experiences` experiences (Chaudhry et al. 2019)")
    experiences: int | None = Field(None, ge=1, description="for first-experiences: how many experiences tuning trains")
    search: Literal["grid", "random", "optuna"] = Field(
        "random", description="Ray Tune's BasicVariantGenerator (grid, random) or OptunaSearch")
    scheduler: Literal["fifo", "asha"] = Field("fifo", description="asha: ASHA with the experience as time")
    num_samples: int = Field(8, ge=1, le=10_000, description="configurations tried per strategy (grid: the whole grid)")
    seeds: list[Annotated[int, Field(ge=0, le=2**32 - 1)]] = Field(
        [100], min_length=1, description="tuning seeds; must not overlap `seeds`")
    metric: Literal["acc", "learning_acc", "bwt", "fwt"] = Field(
        "acc", description="validation metric maximised (val_<metric>): the mean over the tuning seeds")

    @model_validator(mode="after")
    def _experiences_for_protocol(self) -> TuneSpec:
        if (self.protocol == "first-experiences") != (self.experiences is not None):
            raise ValueError("give `experiences` with protocol first-experiences, and only with it")
        return self


class ResourcesSpec(Strict):
    """What each trial gets; fractions of a GPU let several small trials share one."""

    cpus_per_trial: float = Field(1.0, gt=0)
    gpus_per_trial: float = Field(0.0, ge=0)
    max_concurrent: int | None = Field(None, ge=1, description="default: as many as the resources allow")
    max_failures: int = Field(2, ge=0, description="retries of a failed trial, from its last checkpoint")
    device_data_share: float = Field(
        0.5, ge=0, le=1, description="on a GPU: a trial's data moves there once if it fits in this share of "
                                     "the trial's GPU memory (else pinned batches are copied as they train)")


class TrackingSpec(Strict):
    uri: str | None = Field(None, description="MLflow tracking URI; default: SQLite file in the storage root")
    experiment: str | None = Field(None, min_length=1, max_length=256, pattern=_NO_CONTROL,
                                   description="MLflow experiment; default: the pipeline name")


class StorageSpec(Strict):
    root: str = Field(layout.DEFAULT_ROOT, min_length=1, max_length=4096, pattern=_NO_CONTROL,
                      description="folder (or URI) for checkpoints, replay shards, Ray results")
    replay: Literal["arrow", "memory"] = Field(
        "arrow", description="replay memories in durable Arrow shards in the trial folder, or in process memory")


class ReportSpec(Strict):
    compute_budget_flops: float | None = Field(None, gt=0)
    storage_budget_bytes: float | None = Field(None, gt=0)


def _as_list(value: Any) -> Any:
    return value if isinstance(value, list) else [value]


def _grid_model(config: type[StrategyConfig]) -> type[BaseModel]:
    """The spec-side twin of a strategy Config: every scalar hyperparameter may also be a list.

    Each value is checked against the Config field's own type and bounds, with its line in the
    spec; grid.strategy_points builds the Configs from these values without checking them again.
    That is whole only while a Config's checks are its fields' types and bounds: no validators.
    """
    decorators = config.__pydantic_decorators__
    if decorators.field_validators or decorators.model_validators:
        raise TypeError(f"{config.__name__}: a strategy Config checks its values by field types and bounds "
                        "only (the spec grid copies those, not validators)")
    fields: dict[str, Any] = {}
    for name, info in config.model_fields.items():
        annotation = Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
        is_list = getattr(info.annotation, "__origin__", None) is list
        default = info.default
        if name != "name" and not is_list:  # a scalar or a list of them: validated as a list; or a search space
            grid = Annotated[list[annotation], BeforeValidator(_as_list), Field(min_length=1)]  # type: ignore[valid-type]
            annotation = spaces.searchable(f"{config.__name__}_{name}", info.annotation, annotation, grid)
            default = default if default is PydanticUndefined else [default]
        fields[name] = (annotation, Field(default, description=info.description))
    return create_model(f"{config.__name__}Grid", __config__=Strict.model_config, **fields)


GRID_MODELS = {name: _grid_model(cls.Config) for name, cls in REGISTRY.items()}
StrategyGrid = Annotated[Union[tuple(GRID_MODELS.values())], Field(discriminator="name")]
StrategyConfigs = Annotated[Union[tuple(cls.Config for cls in REGISTRY.values())], Field(discriminator="name")]


class PipelineSpec(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
    description: str = ""
    benchmarks: list[BenchmarkSpec] = Field(min_length=1)
    strategies: list[StrategyGrid] = Field(min_length=1)  # type: ignore[valid-type]
    model: ModelSpec = ModelSpec()
    train: TrainGrid = TrainGrid()
    seeds: list[Annotated[int, Field(ge=0, le=2**32 - 1)]] = Field([0], min_length=1)
    tune: TuneSpec | None = Field(None, description="tune-then-test (docs/tuning.md); absent: every configuration "
                                                     "runs on `seeds`")
    resources: ResourcesSpec = ResourcesSpec()
    tracking: TrackingSpec = TrackingSpec()
    storage: StorageSpec = StorageSpec()
    report: ReportSpec = ReportSpec()
    probes: ProbesSpec = ProbesSpec()
    evaluate: EvaluateSpec | None = Field(None, description="continual evaluation between the boundaries; "
                                                            "absent: only at each experience's end")
    max_trials: int = Field(MAX_TRIALS_DEFAULT, ge=1, le=MAX_TRIALS_LIMIT, description="refuse grids larger than this")
    unsupported: Literal["error", "skip"] = Field(
        "error", description="a strategy paired with a benchmark whose scenario it does not apply to: "
                             "refuse the spec, or skip those pairs (studies over several scenarios)")

    @property
    def experiment(self) -> str:
        return self.tracking.experiment or self.name

    @property
    def tracking_uri(self) -> str:
        return self.tracking.uri or layout.sqlite_uri(self.storage.root)

    @property
    def spec_hash(self) -> str:
        """Hash of what the sweep computes. Where it stores and logs, how many trials run at once
        and how often they retry do not change it, so `clgrid resume SPEC --max-concurrent 4` still
        finds the sweep that `clgrid run SPEC --max-concurrent 2` started."""
        operational: dict[str, Any] = {"resources": {"max_concurrent", "max_failures", "device_data_share"}, "storage": {"root"},
                                       "tracking": True, "report": True}
        if not self.probes.enabled:  # a spec without probes keeps the hash it had before they existed
            operational["probes"] = True
        if self.evaluate is None:  # likewise without continual evaluation
            operational["evaluate"] = True
        if self.tune is None:  # and without tuning
            operational["tune"] = True
        return digest(self.model_dump(mode="json", exclude=operational, context=KEYS))


class TrialSpec(Strict):
    """One trial: everything the trainer needs, resolved to scalars; JSON round-trips exactly."""

    pipeline: str
    experiment: str
    spec_hash: str
    benchmark: BenchmarkSpec
    strategy: StrategyConfigs  # type: ignore[valid-type]
    model: ModelSpec
    train: TrainSpec
    seed: int
    resources: ResourcesSpec
    storage: StorageSpec
    probes: ProbesSpec = ProbesSpec()  # measured, not trained: in neither config_key nor trial_key
    evaluate: EvaluateSpec | None = None  # likewise

    @property
    def config_key(self) -> str:
        """Hash of what is trained, without the seed: the seeds of one configuration share it."""
        return digest(self.model_dump(mode="json", include={"benchmark", "strategy", "model", "train"}, context=KEYS))

    @property
    def trial_key(self) -> str:
        """Hash of the resolved trial config: stable across runs of the same spec."""
        return digest({"config": self.config_key, "seed": self.seed})

    @property
    def label(self) -> str:
        return f"{self.strategy.name}/{self.benchmark.id}/{self.benchmark.scenario}/seed{self.seed}"


def digest(obj: Any) -> str:
    """12 hex digits of the SHA-256 of ``obj``'s canonical JSON: the spec, config and trial keys."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]
