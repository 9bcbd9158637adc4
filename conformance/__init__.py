"""The conformance suite: every backend against the float64 NumPy oracle, property by property.

Run it with ``pytest --pyargs reformer_core.conformance [--backends numpy,torch:cuda]`` or
``reformer-core check``; ``conformance/README.md`` is the manual. ``reproduce`` re-runs one
failing case from the line a failure prints.
"""

from __future__ import annotations

__all__ = ["reproduce", "COMPONENT_NAMES"]

COMPONENT_NAMES = (
    "hashing",
    "sorting",
    "lsh_attention",
    "local_attention",
    "full_attention",
    "feed_forward",
    "embedding",
    "reversible",
    "model",
)


def reproduce(component: str, spec: str, dtype: str, case) -> None:
    """Re-run one check: ``component`` on backend ``spec`` in ``dtype`` for ``case``.

    Raises AssertionError (with the details) when the backend does not conform; prints
    ``conforms`` otherwise.
    """
    from .components import run_check
    from .targets import make_target

    target, why = make_target(spec)
    if target is None:
        raise RuntimeError(f"cannot run {spec} here: {why}")
    run_check(component, target, dtype, case)
    print(f"{component} on {spec} ({dtype}): conforms")
