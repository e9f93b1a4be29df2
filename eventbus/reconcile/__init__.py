"""Reconciliation: account for every event in the log, and repair what is not."""

from ._reconciler import R, Reconciler, Reconciliation, check_log
from ._report import ReconcileReport, ReconcilerResult, Repairs, SubscriptionReport

__all__ = [
    "R",
    "ReconcileReport",
    "Reconciler",
    "ReconcilerResult",
    "Reconciliation",
    "Repairs",
    "SubscriptionReport",
    "check_log",
]
