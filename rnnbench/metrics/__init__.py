"""Scores shared by tasks that need more than a one-line formula."""

from rnnbench.metrics.spans import extract_spans, span_f1

__all__ = ["extract_spans", "span_f1"]
