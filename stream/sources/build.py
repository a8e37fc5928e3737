"""The source a worker's receiver runs, from the session's plan."""

from __future__ import annotations

from stream.sources.base import Source, SourcePlan
from stream.sources.dectris import DectrisSource
from stream.sources.merlin import MerlinSource


def build_source(plan: SourcePlan | None, worker: str) -> Source | None:
    """The source for the receiver of ``worker``; None for stemstream/1 (no plan)."""
    if plan is None or plan.kind == "stemstream":
        return None
    if plan.kind == "dectris":
        return DectrisSource(plan, worker)
    if plan.kind == "merlin":
        return MerlinSource(plan, worker)
    raise ValueError(f"unknown detector kind {plan.kind!r}")
