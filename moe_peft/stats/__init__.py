"""Routing statistics: during training (RoutingProbe, used by moe_peft.train's callback) and after it (collect,
plots), for every moe-peft method. Definitions of the summaries: summary.py."""

from .collect import RoutingStats, collect
from .probe import Decision, RoutingProbe, routed_modules
from .summary import Totals, load_cv, max_load, normalized_entropy, summarize

__all__ = [
    "Decision",
    "RoutingProbe",
    "RoutingStats",
    "Totals",
    "collect",
    "load_cv",
    "max_load",
    "normalized_entropy",
    "routed_modules",
    "summarize",
]
