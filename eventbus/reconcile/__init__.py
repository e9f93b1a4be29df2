"""Reconciliation: account for every event in the log, and repair what is not."""

from ._reconciler import R, Reconciler, UserRun, check_log
from ._report import ReconcileReport, ReconcilerResult, Repairs, SubscriptionReport

__all__ = [
    "R",
    "ReconcileReport",
    "Reconciler",
    "ReconcilerResult",
    "Repairs",
    "SubscriptionReport",
    "UserRun",
    "check_log",
]
