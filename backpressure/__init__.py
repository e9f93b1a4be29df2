"""Backpressure: batch-size controllers fed by measured latency and queue depth.

Sans-I/O and free of project imports: every controller is a pure state machine that
takes measurements (with the caller's clock reading) and proposes the next batch size.

* :class:`NaturalController`: whatever is ready, up to ``max_size``; never waits.
* :class:`FixedController`: waits up to ``max_wait`` to fill ``max_size``.
* :class:`AIMDController`: additive increase, multiplicative decrease.
* :class:`GradientController`: the adaptive default; learns how service time grows
  with batch size (:class:`CostModel`) and takes the largest batch that meets a
  latency target, never waiting for one to fill.
"""

from ._controllers import (
    AIMDController,
    BatchController,
    BatchSample,
    FixedController,
    NaturalController,
)
from ._gradient import CostModel, GradientController

__all__ = [
    "AIMDController",
    "BatchController",
    "BatchSample",
    "CostModel",
    "FixedController",
    "GradientController",
    "NaturalController",
]
