"""Publishing: checking and encoding events, the log writer (group commit) and the
window of recent events."""

from ._encoding import EventEncoder
from ._recent import RecentEvents
from ._writer import COMMIT_TARGET_LATENCY, LogWriter, Source

__all__ = ["COMMIT_TARGET_LATENCY", "EventEncoder", "LogWriter", "RecentEvents", "Source"]
