"""Directional finite-difference checks of hand-written vector-Jacobian products.

For a function ``f`` of some primals (pytrees of float64 arrays: nested dicts/lists, tuples
for several arguments), a random cotangent ``g`` of its output and a random direction ``u``
of its inputs, the pullback is right when

    <pullback(g), u>  ==  (<f(x + eps u), g> - <f(x - eps u), g>) / (2 eps)

up to the central difference's O(eps^2) truncation and O(ulp / eps) rounding. With
``eps = 1e-6`` both are far below the ``1e-6`` relative tolerance used here on float64.
``u`` is taken as the step actually made, ``((x + eps u) - (x - eps u)) / (2 eps)`` in
floating point, so inputs much larger than ``eps`` do not blur the direction; and a
direction nearly orthogonal to ``pullback(g)`` (``|cos| < 1e-3``, where the inner product is
a cancellation the difference cannot resolve) is redrawn.

The largest relative error seen per rule is kept in :data:`MAX_ERRORS` (the test module
prints it at the end when run with ``-s``).
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable

import numpy as np
from hypothesis import assume, currently_in_test_context, settings
from hypothesis import strategies as st

import reformer_core as rc

EPS = 1e-6
RTOL = 1e-6
MIN_COSINE = 1e-3  # least |cos(pullback(g), u)| accepted for a direction (see check_vjp)

# rule name -> largest relative error seen in this session
MAX_ERRORS: dict[str, float] = {}
# rule name -> number of directional checks run
COUNTS: dict[str, int] = {}
# rule name -> examples rejected because the perturbation flipped a held-fixed quantity
FLIPS: dict[str, int] = {}


# ------------------------------------------------------------------ pytrees (dict, list, tuple)


def is_leaf(tree: Any) -> bool:
    return not isinstance(tree, (dict, list, tuple))


def tmap(fn: Callable, tree: Any, *rest: Any) -> Any:
    """Leaf-wise ``fn`` over trees of one structure (dicts, lists and tuples are containers)."""
    if isinstance(tree, dict):
        for other in rest:
            assert isinstance(other, dict) and set(other) == set(tree), (sorted(tree), other)
        return {k: tmap(fn, tree[k], *(o[k] for o in rest)) for k in tree}
    if isinstance(tree, (list, tuple)):
        for other in rest:
            assert isinstance(other, (list, tuple)) and len(other) == len(tree), (len(tree), other)
        return type(tree)(tmap(fn, t, *(o[i] for o in rest)) for i, t in enumerate(tree))
    return fn(tree, *rest)


def leaves(tree: Any) -> list:
    if isinstance(tree, dict):
        return [leaf for k in sorted(tree) for leaf in leaves(tree[k])]
    if isinstance(tree, (list, tuple)):
        return [leaf for t in tree for leaf in leaves(t)]
    return [tree]


def structure(tree: Any, path: str = "") -> list:
    """``(path, container kind or leaf shape)`` for every node, to compare two trees exactly."""
    if isinstance(tree, dict):
        out = [(path, "dict", tuple(sorted(tree)))]
        for k in sorted(tree):
            out += structure(tree[k], f"{path}/{k}")
        return out
    if isinstance(tree, (list, tuple)):
        out = [(path, "sequence", len(tree))]
        for i, t in enumerate(tree):
            out += structure(t, f"{path}/{i}")
        return out
    if tree is None:
        return [(path, "None")]
    return [(path, "leaf", tuple(np.shape(tree)))]


def assert_same_structure(grads: Any, primals: Any, what: str = "gradients") -> None:
    """``grads`` has exactly the containers, keys and leaf shapes of ``primals``; leaves are float64."""
    got, want = structure(grads), structure(primals)
    assert got == want, f"{what} structure differs:\n got  {got}\n want {want}"
    for leaf in leaves(grads):
        assert isinstance(leaf, np.ndarray) or np.isscalar(leaf), type(leaf)
        assert np.asarray(leaf).dtype == np.float64, np.asarray(leaf).dtype


def random_like(rng: np.random.Generator, tree: Any) -> Any:
    return tmap(lambda leaf: rng.standard_normal(np.shape(leaf)), tree)


def axpy(a: float, x: Any, y: Any) -> Any:
    """``y + a * x`` leaf-wise."""
    return tmap(lambda xl, yl: yl + a * xl, x, y)


def inner(a: Any, b: Any) -> float:
    return float(sum(np.sum(np.asarray(x, dtype=np.float64) * np.asarray(y, dtype=np.float64))
                     for x, y in zip(leaves(a), leaves(b))))


def norm(tree: Any) -> float:
    return math.sqrt(inner(tree, tree))


def relative_error(fd: float, an: float) -> float:
    return abs(fd - an) / max(abs(an), 1e-12)


def record(rule: str, error: float) -> None:
    MAX_ERRORS[rule] = max(MAX_ERRORS.get(rule, 0.0), error)
    COUNTS[rule] = COUNTS.get(rule, 0) + 1


# ------------------------------------------------------------------ the check


def check_vjp(
    rule: str,
    f: Callable[..., Any],
    pullback: Callable[[Any], Any],
    primals: tuple,
    out: Any,
    rng: np.random.Generator,
    *,
    eps: float = EPS,
    rtol: float = RTOL,
    fixed: Callable[..., Any] | None = None,
    cotangent: Any = None,
) -> float:
    """Check ``pullback`` (the VJP of ``f`` at ``primals``) along one random direction.

    Args:
        rule: name under which the error is recorded.
        f: ``f(*primals) -> output pytree`` (the forward, or a bucket-fixed stand-in).
        pullback: ``pullback(cotangent) -> gradients``, a tuple with one pytree per primal.
        primals: tuple of input pytrees (float64 leaves).
        out: the rule's forward output at ``primals``; it must equal ``f(*primals)``.
        fixed: optional ``fixed(*primals) -> array``: what must not change between
            ``x - eps u``, ``x`` and ``x + eps u`` (if it does, the hypothesis example is
            rejected with ``assume``; outside hypothesis, the check fails).
        cotangent: a given cotangent instead of a random one.

    Returns the relative error; asserts it is below ``rtol`` and that the gradients have
    exactly the primals' structure and shapes.
    """
    for got, want in zip(leaves(f(*primals)), leaves(out), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12,
                                   err_msg=f"{rule}: forward of the rule differs from f")
    g = random_like(rng, out) if cotangent is None else cotangent
    grads = pullback(g)
    assert_same_structure(tuple(grads), tuple(primals), f"{rule} gradients")
    grad_norm = norm(grads)
    for _ in range(20):
        u = random_like(rng, primals)
        plus, minus = axpy(eps, u, primals), axpy(-eps, u, primals)
        # The step actually taken: x +- eps u is rounded, which matters where |x| >> eps |u|
        # (e.g. a log-sum-exp of -1e5, whose ulp is 1.5e-11).
        step = tmap(lambda p, m: (p - m) / (2 * eps), plus, minus)
        an = inner(grads, step)
        # A direction almost orthogonal to the gradient makes <pullback(g), u> a cancellation
        # of O(1) terms, which no finite difference resolves to 1e-6 relative: draw another.
        if abs(an) >= MIN_COSINE * grad_norm * norm(step):
            break
    if fixed is not None:
        base = fixed(*primals)
        for point in (plus, minus):
            same = all(np.array_equal(a, b) for a, b in zip(leaves(fixed(*point)), leaves(base)))
            FLIPS[rule] = FLIPS.get(rule, 0) + (not same)
            if currently_in_test_context():
                assume(same)  # a bucket flipped: this example says nothing about the rule
            else:
                assert same, f"{rule}: the perturbation flipped a held-fixed quantity; pick another input"
    # Difference leaf-wise before the dot product: outputs may hold huge constants (a fully
    # masked row's log-sum-exp is about -1e9) that would swamp a difference of two sums.
    fd = inner(tmap(lambda a, b: np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64),
                    f(*plus), f(*minus)), g) / (2 * eps)
    error = relative_error(fd, an)
    record(rule, error)
    assert error < rtol, f"{rule}: finite difference {fd!r} vs pullback {an!r} (relative error {error:.3e})"
    return error


def report() -> str:
    width = max((len(k) for k in MAX_ERRORS), default=4)
    lines = [f"{'rule'.ljust(width)}  checks  max relative error"]
    for rule in sorted(MAX_ERRORS):
        flips = f"  ({FLIPS[rule]} examples rejected: bucket flip)" if FLIPS.get(rule) else ""
        lines.append(f"{rule.ljust(width)}  {COUNTS[rule]:6d}  {MAX_ERRORS[rule]:.3e}{flips}")
    return "\n".join(lines)


# ---------------------------------------------------------------- shared by the gradient test modules

seeds = st.integers(0, 2**32 - 1)
NUMPY = rc.backend_for(np.zeros(1))


# GRADCHECK_EXAMPLES=10 runs ten times as many hypothesis examples (a longer soak).
EXAMPLES_SCALE = float(os.environ.get("GRADCHECK_EXAMPLES", "1"))


def fast(n):
    return settings(max_examples=max(1, int(n * EXAMPLES_SCALE)), deadline=None)




def padding_mask(draw, rng, batch, length):
    """None, or a random bool (batch, length) mask (suffix padding or scattered holes)."""
    kind = draw(st.sampled_from(["none", "none", "suffix", "random"]))
    if kind == "none":
        return None
    if kind == "suffix":
        mask = np.ones((batch, length), dtype=bool)
        for b in range(batch):
            mask[b, length - draw(st.integers(0, length - 1)):] = False
        return mask
    return rng.random((batch, length)) < 0.7


def keep_mask(rng, shape, rate=0.3):
    return rng.random(shape) >= rate


def naive_causal_attention(q, k, v):
    """softmax(q k^T / sqrt(d), causal) v in float64 NumPy: what backends' native kernels compute."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    logits = q @ np.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1])
    length = q.shape[-2]
    logits = np.where(np.tril(np.ones((length, length), bool)), logits, -np.inf)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    return (weights / weights.sum(-1, keepdims=True)) @ v
