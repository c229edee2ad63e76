"""The pipeline spec: its schema, the grid of trials it names, and loading it from YAML."""

from clgrid.spec.schema import (
    MAX_PROBLEMS, PipelineSpec, SpecError, TrialSpec, bundled_pipelines, expand, grid_size, load_spec,
    parse_spec, resolve_spec_path, semantic_problems, strategy_points,
)

__all__ = ["MAX_PROBLEMS", "PipelineSpec", "SpecError", "TrialSpec", "bundled_pipelines", "expand", "grid_size",
           "load_spec", "parse_spec", "resolve_spec_path", "semantic_problems", "strategy_points"]
