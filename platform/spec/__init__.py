"""The pipeline spec: its models (schema), the trials it names (grid), and loading it from YAML
(problems, through the hardened loader in yaml_safe). Specs are files or bundled pipelines
(clgrid.pipelines); the errors are clgrid.errors.SpecError."""

from clgrid.errors import SpecError
from clgrid.pipelines import bundled as bundled_pipelines, resolve as resolve_spec_path
from clgrid.spec.grid import expand, grid_size, pairs, strategy_points, trial_count
from clgrid.spec.problems import MAX_PROBLEMS, load_spec, parse_spec, semantic_problems
from clgrid.spec.schema import PipelineSpec, TrialSpec

__all__ = ["MAX_PROBLEMS", "PipelineSpec", "SpecError", "TrialSpec", "bundled_pipelines", "expand", "grid_size",
           "load_spec", "pairs", "parse_spec", "resolve_spec_path", "semantic_problems", "strategy_points",
           "trial_count"]
