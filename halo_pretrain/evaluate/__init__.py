"""Evaluation: perplexity on a prepared split and synthetic long-context probes (`halo-eval`)."""

from .perplexity import perplexity
from .probes import TASKS, ProbeExample, accuracy_table, make_example, make_suite, run_suite

__all__ = ["perplexity", "TASKS", "ProbeExample", "accuracy_table", "make_example", "make_suite", "run_suite"]
