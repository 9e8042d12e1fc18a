"""Evaluation of a run at every rank: ``evaluate_run(run_dir, EvalSpec(...))``.

``spec`` (what is asked), ``tasks`` (items, stops, metrics), ``backends`` (built-in or lm-eval), ``generate``
(stacked generation and scoring), ``extract`` (lm-eval's answer filters), ``results`` (stored per-rank records,
eval.json) and ``run`` (the flow).
"""
from .run import evaluate_run
from .spec import EvalSpec

__all__ = ["evaluate_run", "EvalSpec"]
