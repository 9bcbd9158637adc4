"""Deliberately broken backend adapters, to prove the conformance suite catches them.

``WrappedArray`` is a minimal array type of its own (so the core dispatches to *our*
namespace through ``__array_namespace__``): every function of the namespace unwraps its
arguments, calls NumPy's Array API namespace and wraps the results. ``Faithful`` changes
nothing (the control); the broken ones change one thing each.
"""

from __future__ import annotations

import operator

import numpy as np
from array_api_compat import numpy as np_xp

from reformer_core._attention.attend import SELF_MASK_VALUE
from reformer_core.backends.numpy.adapter import NumpyBackend


def _unwrap(value):
    if isinstance(value, WrappedArray):
        return value.data
    if isinstance(value, (list, tuple)):
        return type(value)(_unwrap(v) for v in value)
    return value


def _wrap(value, namespace):
    if isinstance(value, np.ndarray) or isinstance(value, np.generic):
        return WrappedArray(np.asarray(value), namespace)
    if isinstance(value, tuple):
        return tuple(_wrap(v, namespace) for v in value)
    return value


class Namespace:
    """NumPy's Array API namespace behind a wrapper; subclasses override single functions."""

    def __getattr__(self, name):
        attribute = getattr(np_xp, name)
        if not callable(attribute) or isinstance(attribute, type):
            return attribute

        def call(*args, **kwargs):
            result = attribute(*_unwrap(args), **{k: _unwrap(v) for k, v in kwargs.items()})
            return _wrap(result, self)

        return call


class WrappedArray:
    __array_priority__ = 1000

    def __init__(self, data: np.ndarray, namespace: Namespace):
        self.data, self.namespace = data, namespace

    def __array_namespace__(self, api_version=None):
        return self.namespace

    shape = property(lambda self: self.data.shape)
    ndim = property(lambda self: self.data.ndim)
    dtype = property(lambda self: self.data.dtype)
    size = property(lambda self: self.data.size)
    device = property(lambda self: "cpu")
    mT = property(lambda self: WrappedArray(np.swapaxes(self.data, -1, -2), self.namespace))

    def __getitem__(self, key):
        return WrappedArray(np.asarray(self.data[_unwrap(key)]), self.namespace)

    def __bool__(self):
        return bool(self.data)

    def __int__(self):
        return int(self.data)

    def __float__(self):
        return float(self.data)

    def __index__(self):
        return operator.index(self.data)

    def __repr__(self):
        return f"WrappedArray({self.data!r})"


def _binary(op, reflected=False):
    def method(self, other):
        a, b = self.data, _unwrap(other)
        return WrappedArray(np.asarray(op(b, a) if reflected else op(a, b)), self.namespace)

    return method


for _name, _op in [("add", operator.add), ("sub", operator.sub), ("mul", operator.mul),
                   ("truediv", operator.truediv), ("floordiv", operator.floordiv), ("mod", operator.mod),
                   ("pow", operator.pow), ("matmul", operator.matmul), ("and", operator.and_),
                   ("or", operator.or_)]:
    setattr(WrappedArray, f"__{_name}__", _binary(_op))
    setattr(WrappedArray, f"__r{_name}__", _binary(_op, reflected=True))
for _name, _op in [("lt", operator.lt), ("le", operator.le), ("gt", operator.gt), ("ge", operator.ge),
                   ("eq", operator.eq), ("ne", operator.ne)]:
    setattr(WrappedArray, f"__{_name}__", _binary(_op))
WrappedArray.__neg__ = lambda self: WrappedArray(-self.data, self.namespace)
WrappedArray.__invert__ = lambda self: WrappedArray(~self.data, self.namespace)
WrappedArray.__hash__ = None


class _WrappedBackend(NumpyBackend):
    """The NumPy backend, but its arrays are WrappedArrays in ``namespace_class``'s namespace."""

    namespace_class = Namespace
    framework = __name__.split(".", 1)[0]

    def __init__(self, device=None):
        super().__init__(device)
        self._namespace = self.namespace_class()

    @property
    def xp(self):
        return self._namespace

    def owns(self, array):
        return isinstance(array, WrappedArray)

    def from_numpy(self, array, *, dtype=None):
        return WrappedArray(super().from_numpy(array, dtype=dtype), self._namespace)

    def to_numpy(self, array):
        return np.asarray(array.data)


class Faithful(_WrappedBackend):
    name = "faithful-wrapper"


class _SelfMaskDropped(Namespace):
    def where(self, condition, x1, x2):
        # the core writes the self mask as where(is_self, -1e5, logits): skip exactly that
        if isinstance(x1, WrappedArray) and x1.ndim == 0 and float(x1.data) == SELF_MASK_VALUE:
            return x2
        return _wrap(np_xp.where(_unwrap(condition), _unwrap(x1), _unwrap(x2)), self)


class SelfMaskDropped(_WrappedBackend):
    name = "broken-self-mask"
    namespace_class = _SelfMaskDropped


class _PerturbedMatmul(Namespace):
    def matmul(self, x1, x2):
        out = np.array(np_xp.matmul(_unwrap(x1), _unwrap(x2)))
        if out.size:  # the lean LSH pullback multiplies by zero-width values (an empty product)
            out.reshape(-1)[0] += 1e-6 * max(1.0, abs(float(out.reshape(-1)[0])))
        return _wrap(out, self)


class PerturbedMatmul(_WrappedBackend):
    name = "broken-matmul"
    namespace_class = _PerturbedMatmul
