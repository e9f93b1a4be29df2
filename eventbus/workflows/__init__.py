"""Durable workflows: a run's steps, checkpointed; the engine that runs and resumes them."""

from ._engine import WorkflowEngine, WorkflowHandle, unfinished_runs
from ._workflow import (
    StepFailed,
    StepInfo,
    StepStatus,
    Workflow,
    WorkflowCancelled,
    WorkflowError,
    WorkflowFailed,
    WorkflowFunction,
    WorkflowIncompatible,
    WorkflowStatus,
    current_step,
)

__all__ = [
    "StepFailed",
    "StepInfo",
    "StepStatus",
    "Workflow",
    "WorkflowCancelled",
    "WorkflowEngine",
    "WorkflowError",
    "WorkflowFailed",
    "WorkflowFunction",
    "WorkflowHandle",
    "WorkflowIncompatible",
    "WorkflowStatus",
    "current_step",
    "unfinished_runs",
]
