"""Turn run folders into tables and plots."""
from samfit.report.collect import collect_runs
from samfit.report.table import comparison_grid, render, summarise

__all__ = ["collect_runs", "comparison_grid", "render", "summarise"]
