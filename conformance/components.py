"""One check per component: run it on the target backend, run the float64 oracle on the same
(rounded) inputs, and compare forward results and gradients.

Gradients on the target come from ``backend.vjp``: the hand-written rules on NumPy, CuPy
and array_api_strict, the framework's autodiff on PyTorch and JAX. The oracle always uses
the hand-written rules in float64 (themselves checked against finite differences in the
project's own tests).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
from array_api_compat import numpy as np_xp

import reformer_core as rc
from reformer_core import Differentiable, full_attention_vjp, local_attention_vjp, lsh_attention_vjp, tree_map, tree_paths
from reformer_core import reversible_backward, reversible_forward, value_and_grad
from reformer_core._attention.sorting import sort_by_bucket
from reformer_core._model import blocks, lm
from reformer_core._model.autodiff import rule_vjp

from .assertions import compare, reproduction
from .oracle import (
    capture_traced,
    check_buckets,
    record_buckets,
    record_gates,
    release_captured,
    replay_buckets,
    replay_gates,
)

__all__ = ["COMPONENTS", "run_check"]


# ---------------------------------------------------------------- helpers


class _On:
    """Moving float64 host arrays to the target in ``dtype``, and rounding them as it does."""

    def __init__(self, target, dtype: str) -> None:
        self.target, self.dtype, self.backend = target, dtype, target.backend

    def put(self, array):
        if array is None:
            return None
        if np.issubdtype(np.asarray(array).dtype, np.floating):
            return self.backend.from_numpy(array, dtype=self.dtype)
        return self.backend.from_numpy(array)

    def rounded(self, array):
        """The float64 values the target actually holds for ``array``."""
        if array is None or not np.issubdtype(np.asarray(array).dtype, np.floating):
            return array
        return np.asarray(self.backend.to_numpy(self.put(array))).astype(np.float64)

    def put_tree(self, tree):
        return tree_map(self.put, tree)

    def host(self, array):
        return np.asarray(self.backend.to_numpy(array))


def _on_target(target, fn: Callable) -> Callable:
    """``fn`` as the target runs it: as is, or compiled by ``backend.jit`` for a ``+jit`` target
    (``fn`` then takes only arrays and pytrees of arrays). A compiled ``fn`` also returns the
    buckets and ReLU gates it computed, which go to the active recorders as eager ones do."""
    if not target.jit:
        return fn

    def traced(*args):
        with capture_traced(target.backend.stop_gradient) as captured:
            return fn(*args), captured

    compiled = target.backend.jit(traced)

    def run(*args):
        out, captured = compiled(*args)
        release_captured(captured, target.backend.to_numpy)
        return out

    return run


def _vjp_on_target(target, forward: Callable, rule: Callable, primals: tuple, cotangent):
    def run(primals, cotangent):
        out, pullback = target.backend.vjp(Differentiable(forward, rule), *primals)
        return out, pullback(cotangent)

    return _on_target(target, run)(primals, cotangent)


def _compare_tree(got, expected, **kwargs) -> None:
    expected_paths = dict(tree_paths(expected))
    got_paths = dict(tree_paths(got))
    if set(got_paths) != set(expected_paths):
        raise AssertionError(f"gradient tree differs: {sorted(set(got_paths) ^ set(expected_paths))}")
    for path, leaf in got_paths.items():
        compare(leaf, expected_paths[path], quantity=f"d {path}", kind="grad", **kwargs)


def _fail(failures, component, target, dtype, case):
    if failures:
        raise AssertionError(f"{component} on {target.spec} ({dtype}): " + "; ".join(failures) + "\n"
                             + reproduction(component, target, dtype, case))


# ---------------------------------------------------------------- hashing and sorting


def check_hashing(target, dtype, case) -> None:
    on, a = _On(target, dtype), case.arrays()
    got = _on_target(target, lambda qk, r, keep: rc.hash_vectors(qk, r, case.num_buckets, attention_mask=keep))(
        on.put(a["qk"]), on.put(a["rotations"]), on.put(a["keep"]))
    expected, real = check_buckets(on.host(got), on.rounded(a["qk"]), on.rounded(a["rotations"]),
                                   case.num_buckets, a["keep"], dtype)
    _fail([f"{real} bucket ids differ by more than a rounding tie"] if real else [], "hashing", target, dtype, case)
    compare(got, expected, target=target, dtype=dtype, component="hashing", quantity="buckets", case=case,
            exact=True)


def check_sorting(target, dtype, case) -> None:
    on, a = _On(target, dtype), case.arrays()
    buckets = np.asarray(rc.hash_vectors(a["qk"], a["rotations"], case.num_buckets, attention_mask=a["keep"]))
    perm, undo = _on_target(target, lambda b: sort_by_bucket(target.backend.xp, b))(on.put(buckets))
    expected_perm, expected_undo = sort_by_bucket(np_xp, buckets)
    for name, got, expected in (("perm", perm, expected_perm), ("undo", undo, expected_undo)):
        compare(got, expected, target=target, dtype=dtype, component="sorting", quantity=name, case=case, exact=True)


# ---------------------------------------------------------------- attention


def _attention_check(component, target, dtype, case, names, forward, vjp) -> None:
    """Forward and gradients of an attention function of the arrays ``names``.

    ``forward(place, *inputs)`` and ``vjp(place, *inputs)`` get the rest of the case's arrays
    (rotations, mask) through ``place``: ``on.put`` for the target, ``on.rounded`` for the
    oracle, which so sees exactly the values the target holds.
    """
    on, a = _On(target, dtype), case.arrays()
    failures: list[str] = []
    with record_buckets(on.host) as recorded:
        out = _on_target(target, lambda *xs: forward(on.put, *xs))(*(on.put(a[n]) for n in names))
    with replay_buckets(recorded, dtype, failures):
        expected, pullback = vjp(on.rounded, *(on.rounded(a[n]) for n in names))
        expected_grads = pullback(on.rounded(a["d_out"]))
    _fail(failures, component, target, dtype, case)
    kwargs = dict(target=target, dtype=dtype, component=component, case=case)
    compare(out, expected, quantity="out", **kwargs)
    with record_buckets(on.host):
        _, grads = _vjp_on_target(target, lambda *xs: forward(on.put, *xs), lambda *xs: vjp(on.put, *xs),
                                  tuple(on.put(a[n]) for n in names), on.put(a["d_out"]))
    for name, got, want in zip(names, grads, expected_grads):
        compare(got, want, quantity=f"d {name}", kind="grad", **kwargs)


def check_lsh_attention(target, dtype, case) -> None:
    a = case.arrays()

    def forward(place, qk, v):
        return rc.lsh_attention(qk, v, place(a["rotations"]), attention_mask=place(a["keep"]), **case.lsh_kwargs())

    def vjp(place, qk, v):
        return lsh_attention_vjp(qk, v, place(a["rotations"]), attention_mask=place(a["keep"]),
                                     **case.lsh_kwargs())

    _attention_check("lsh_attention", target, dtype, case, ("qk", "v"), forward, vjp)


def check_local_attention(target, dtype, case) -> None:
    keep = case.arrays()["keep"]

    def forward(place, q, k, v):
        return rc.local_attention(q, k, v, attention_mask=place(keep), **case.local_kwargs())

    def vjp(place, q, k, v):
        return local_attention_vjp(q, k, v, attention_mask=place(keep), **case.local_kwargs())

    _attention_check("local_attention", target, dtype, case, ("q", "k", "v"), forward, vjp)


def check_full_attention(target, dtype, case) -> None:
    keep = case.arrays()["keep"]

    def forward(place, qk, v):
        return rc.full_attention(qk, v, attention_mask=place(keep), causal=case.causal)

    def vjp(place, qk, v):
        return full_attention_vjp(qk, v, attention_mask=place(keep), causal=case.causal)

    _attention_check("full_attention", target, dtype, case, ("qk", "v"), forward, vjp)


# ---------------------------------------------------------------- layers


def _scaled_params(config, seed):
    """Parameters with weights large enough that every nonlinearity matters."""
    return tree_map(lambda w: w * 5 if w.ndim == 2 else w + 0.3, rc.init_params(config, seed, backend="numpy",
                                                                                 dtype="float64"))


def _params_check(component, target, dtype, case, params64, x64, d_out64, forward, rule) -> None:
    on = _On(target, dtype)
    kwargs = dict(target=target, dtype=dtype, component=component, case=case)
    xp = target.backend.xp
    failures: list[str] = []
    with record_gates(on.host) as gates:
        out = _on_target(target, lambda p, x: forward(xp, p, x))(on.put_tree(params64), on.put(x64))
        _, grads = _vjp_on_target(target, lambda p, x: forward(xp, p, x), lambda p, x: rule(xp, p, x),
                                  (on.put_tree(params64), on.put(x64)), on.put(d_out64))
    with replay_gates(gates, dtype, failures):
        expected, pullback = rule(np_xp, tree_map(on.rounded, params64), on.rounded(x64))
        expected_grads = pullback(on.rounded(d_out64))
    _fail(failures, component, target, dtype, case)
    compare(out, expected, quantity="out", **kwargs)
    _compare_tree(grads[0], expected_grads[0], **kwargs)
    if grads[1] is not None and expected_grads[1] is not None:
        compare(grads[1], expected_grads[1], quantity="d x", kind="grad", **kwargs)


def check_feed_forward(target, dtype, case) -> None:
    config, a = case.config(), case.arrays()
    params = _scaled_params(config, case.seed)["layers"][0]["feed_forward"]
    _params_check("feed_forward", target, dtype, case, params, a["x"], a["d_out"],
                  lambda xp, p, x: blocks.feed_forward_block(xp, p, x, config),
                  lambda xp, p, x: blocks.feed_forward_block_vjp(xp, p, x, config))


def check_embedding(target, dtype, case) -> None:
    config, a = case.config(), case.arrays()
    params = _scaled_params(config, case.seed)["embedding"]
    on = _On(target, dtype)
    tokens = a["tokens"]

    def forward(xp, p, _x):
        return lm.embed(xp, p, on.put(tokens) if xp is not np_xp else tokens, config)

    def rule(xp, p, _x):
        out, pullback = lm.embed_vjp(xp, p, on.put(tokens) if xp is not np_xp else tokens, config)
        return out, lambda d: (pullback(d), None)

    _params_check("embedding", target, dtype, case, params, a["x"], a["d_out"], forward, rule)


# ---------------------------------------------------------------- reversible stack and model


def check_reversible(target, dtype, case) -> None:
    """Forward, inverse and reversible backward of the model's stack."""
    config, a = case.config(), case.arrays()
    on = _On(target, dtype)
    kwargs = dict(target=target, dtype=dtype, component="reversible", case=case)
    params64 = _scaled_params(config, case.seed)
    failures: list[str] = []

    def run(xp, params, x, keep, cotangent, vjp):
        rotations = rc.sample_rotations(config, case.length, case.seed, like=x)
        masks = lm.sample_dropout_masks(config, case.batch, case.length, case.seed, backend=rc.backend_for(x)) \
            if config.hidden_dropout else None
        layers = blocks.reversible_layers(xp, params, config, rotations=rotations, attention_mask=keep,
                                          dropout_masks=masks)
        y1, y2 = reversible_forward(layers, x, x)
        rebuilt, d_x, grads = reversible_backward(layers, y1, y2, cotangent, cotangent, vjp=vjp)
        return y1, y2, rebuilt, d_x, grads

    x64 = a["x"]
    with record_buckets(on.host) as recorded, record_gates(on.host) as gates:
        y1, y2, rebuilt, d_x, grads = _on_target(
            target, lambda p, x, keep, d: run(target.backend.xp, p, x, keep, d, target.backend.vjp)
        )(on.put_tree(params64), on.put(x64), on.put(a["keep"]), on.put(x64[::-1].copy()))
    with replay_buckets(recorded, dtype, failures), replay_gates(gates, dtype, failures):
        e_y1, e_y2, _, e_dx, e_grads = run(np_xp, tree_map(on.rounded, params64), on.rounded(x64), a["keep"],
                                           on.rounded(x64[::-1].copy()), rule_vjp)
    _fail(failures, "reversible", target, dtype, case)
    compare(y1, e_y1, quantity="y1", **kwargs)
    compare(y2, e_y2, quantity="y2", **kwargs)
    compare(rebuilt[0], on.rounded(x64), quantity="inverse x1", **kwargs)
    compare(rebuilt[1], on.rounded(x64), quantity="inverse x2", **kwargs)
    compare(d_x[0], e_dx[0], quantity="d x1", kind="grad", **kwargs)
    compare(d_x[1], e_dx[1], quantity="d x2", kind="grad", **kwargs)
    for i, ((d_f, d_g), (e_f, e_g)) in enumerate(zip(grads, e_grads)):
        _compare_tree({f"layers/{i}/attention": d_f, f"layers/{i}/feed_forward": d_g},
                      {f"layers/{i}/attention": e_f, f"layers/{i}/feed_forward": e_g}, **kwargs)


def check_model(target, dtype, case) -> None:
    """Logits of ``apply`` and the loss and gradient of ``value_and_grad``."""
    config, a = case.config(), case.arrays()
    on = _On(target, dtype)
    kwargs = dict(target=target, dtype=dtype, component="model", case=case)
    params64 = _scaled_params(config, case.seed)
    dropout_seed = case.seed if case.dropout else None
    failures: list[str] = []

    def run(params, tokens, targets, keep, check_values=True):
        logits = rc.apply(params, tokens, config, rotations_seed=case.seed, attention_mask=keep,
                          dropout_seed=dropout_seed, check_values=check_values)
        loss, grads = value_and_grad(params, tokens, targets, config, rotations_seed=case.seed,
                                     attention_mask=keep, dropout_seed=dropout_seed, check_values=check_values)
        return logits, loss, grads

    with record_buckets(on.host) as recorded, record_gates(on.host) as gates:
        # Token values cannot be checked while traced (int() of a tracer).
        logits, loss, grads = _on_target(target, lambda *args: run(*args, check_values=not target.jit))(
            on.put_tree(params64), on.put(a["tokens"]), on.put(a["targets"]), on.put(a["keep"]))
    with replay_buckets(recorded, dtype, failures), replay_gates(gates, dtype, failures):
        e_logits, e_loss, e_grads = run(tree_map(on.rounded, params64), a["tokens"], a["targets"], a["keep"])
    _fail(failures, "model", target, dtype, case)
    compare(logits, e_logits, quantity="logits", **kwargs)
    loss_dtype = "float64" if dtype == "float64" else "float32"
    # The loss is float32 for float32/bfloat16 logits, but its error is that of the tested dtype's logits.
    compare(loss, np.asarray(e_loss), quantity="loss", result_dtype=loss_dtype, **kwargs)
    _compare_tree(grads, e_grads, **kwargs)


COMPONENTS: dict[str, Callable[[Any, str, Any], None]] = {
    "hashing": check_hashing,
    "sorting": check_sorting,
    "lsh_attention": check_lsh_attention,
    "local_attention": check_local_attention,
    "full_attention": check_full_attention,
    "feed_forward": check_feed_forward,
    "embedding": check_embedding,
    "reversible": check_reversible,
    "model": check_model,
}


def run_check(component: str, target, dtype: str, case) -> None:
    """Run one component's check (raises AssertionError with a reproduction on failure)."""
    if component not in COMPONENTS:
        raise ValueError(f"unknown component {component!r}; known: {', '.join(COMPONENTS)}")
    with rc.use_backend(target.backend):  # what the core creates (rotations, masks) goes to the target
        COMPONENTS[component](target, dtype, case)
