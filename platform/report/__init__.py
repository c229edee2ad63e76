"""The cost-vs-forgetting report of a sweep's MLflow runs. Imports no torch."""

from clgrid.report.aggregate import BUDGET_KEYS
from clgrid.report.build import ReportResult, build_report
from clgrid.report.collect import ReportError
from clgrid.report.stats import pareto_front, summarize

__all__ = ["BUDGET_KEYS", "ReportError", "ReportResult", "build_report", "pareto_front", "summarize"]
