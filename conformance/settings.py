"""Hypothesis settings of the suite: examples from ``--max-examples`` or the environment."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

__all__ = ["conformance_settings"]


def conformance_settings(scale: float = 1.0):
    """Settings for one test; ``scale`` shrinks the example count of expensive tests."""
    examples = int(os.environ.get("REFORMER_CONFORMANCE_EXAMPLES", "10"))
    return settings(
        max_examples=max(1, int(examples * scale)),
        deadline=None,
        # Reproducible by default (CI must not flake); REFORMER_CONFORMANCE_RANDOM=1 draws fresh examples.
        derandomize=not os.environ.get("REFORMER_CONFORMANCE_RANDOM"),
        # The `target` fixture is a stateless backend adapter, safe to share across examples.
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
    )
