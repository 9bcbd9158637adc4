"""NumPy: the reference oracle (float64-capable, CPU only)."""

from __future__ import annotations

import numpy as np
from array_api_compat import numpy as compat_numpy

from ._base import Backend


class NumpyBackend(Backend):
    name = "numpy"
    framework = "numpy"
    extra = None
    capabilities = frozenset({"float64"})

    @property
    def xp(self):
        return compat_numpy

    def devices(self) -> list:
        return ["cpu"]

    def from_numpy(self, array, *, dtype=None):
        out = np.array(array, copy=True)
        return out if dtype is None else out.astype(self.dtype(dtype), copy=False)

    def to_numpy(self, array):
        return np.asarray(array)

    def version(self) -> str:
        return np.__version__


BACKEND = NumpyBackend
