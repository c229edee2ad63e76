"""Search spaces: the values a hyperparameter may take in a tuned spec (``tune:``).

A value is itself, a list is a grid axis (a categorical under random or Optuna search), and a
one-key mapping is a distribution: ``{loguniform: [lo, hi]}`` and ``{uniform: [lo, hi]}`` for
floats, ``{randint: [lo, hi]}`` (both ends included) for integers, ``{choice: [...]}`` for any
field. ``lo``, ``hi`` and every choice are validated as values of the field they sample, with the
field's own type and bounds, so a distribution never draws a value the field would refuse.
"""

from __future__ import annotations

from types import UnionType
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, create_model, model_validator

KINDS = ("loguniform", "uniform", "randint", "choice")
_CONFIG = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Space(BaseModel):
    """A distribution over one field's values (one of KINDS, the model's single field)."""

    model_config = _CONFIG

    @property
    def kind(self) -> str:
        return next(iter(type(self).model_fields))

    @property
    def values(self) -> Any:
        return getattr(self, self.kind)

    def domain(self):
        """The Ray Tune domain of this distribution."""
        from ray import tune

        lo_hi = self.values
        if self.kind == "choice":
            return tune.choice(list(lo_hi))
        if self.kind == "randint":
            return tune.randint(lo_hi[0], lo_hi[1] + 1)  # Ray's upper end is excluded; ours is not
        return getattr(tune, self.kind)(*lo_hi)


class _Range(Space):
    @model_validator(mode="after")
    def _ordered(self) -> _Range:
        lo, hi = self.values
        if not lo < hi:
            raise ValueError(f"{self.kind}: expected [lo, hi] with lo < hi, got [{lo}, {hi}]")
        if self.kind == "loguniform" and lo <= 0:
            raise ValueError(f"loguniform: expected lo > 0 (a logarithmic scale), got {lo}")
        return self


def _kind(value: Any, takes_dicts: bool) -> str | None:
    if isinstance(value, Space):
        return value.kind
    if isinstance(value, dict):
        if len(value) == 1 and next(iter(value)) in KINDS:
            return next(iter(value))
        return "grid" if takes_dicts else None  # a dict-valued field's value (finetune_layers' layers)
    return "grid"


def _takes_dicts(annotation: Any) -> bool:
    if annotation is dict or get_origin(annotation) is dict:
        return True
    return get_origin(annotation) in (Union, UnionType) and any(_takes_dicts(a) for a in get_args(annotation))


def _kinds_for(base: Any) -> tuple[str, ...]:
    """The distributions a field of type ``base`` takes: ranges need numbers of their own type."""
    if base is float:
        return ("loguniform", "uniform", "choice")
    if base is int:
        return ("randint", "choice")
    return ("choice",)


def searchable(name: str, base: Any, value: Any, grid: Any) -> Any:
    """The annotation of a spec field whose values have type ``value`` (with its bounds): ``grid``
    (the annotation of a value or list) or one of the distributions its type ``base`` allows."""
    members = [Annotated[grid, Tag("grid")]]
    for kind in _kinds_for(base):
        field = (Annotated[list[value], Field(min_length=1)] if kind == "choice" else tuple[value, value], ...)
        model = create_model(f"{name}_{kind}", __base__=Space if kind == "choice" else _Range, **{kind: field})
        members.append(Annotated[model, Tag(kind)])
    allowed = ", ".join(f"{{{k}: [...]}}" for k in _kinds_for(base))
    takes_dicts = _takes_dicts(base)
    return Annotated[Union[tuple(members)], Discriminator(
        lambda v: _kind(v, takes_dicts), custom_error_type="search_space",
        custom_error_message=f"expected a value, a list (a grid axis) or a distribution: {allowed}")]
