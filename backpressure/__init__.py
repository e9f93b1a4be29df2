"""Backpressure: batch-size controllers fed by measured latency and queue depth.

Sans-I/O and free of project imports: every controller is a pure state machine that
takes measurements (with the caller's clock reading) and proposes the next batch size.
"""

from ._controllers import (
    AIMDController,
    BatchController,
    BatchSample,
    FixedController,
    GradientController,
    NaturalController,
)

__all__ = [
    "AIMDController",
    "BatchController",
    "BatchSample",
    "FixedController",
    "GradientController",
    "NaturalController",
]
