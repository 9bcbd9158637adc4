"""NumPy: the reference oracle (float64-capable, CPU only)."""

from __future__ import annotations

import numpy as np

from .._base import Backend


class NumpyBackend(Backend):
    name = "numpy"
    framework = "numpy"
    array_modules = ("numpy",)
    extra = None

    @property
    def capabilities(self) -> frozenset:
        # NumPy reports its buffers to tracemalloc, so host memory is measured exactly.
        return frozenset({"float64", "tracemalloc"})

    @property
    def xp(self):
        from array_api_compat import numpy as compat_numpy

        return compat_numpy

    def devices(self) -> list:
        return ["cpu"]

    def from_numpy(self, array, *, dtype=None):
        out = np.array(array, copy=True)
        return out if dtype is None else out.astype(self.dtype(dtype), copy=False)

    def to_numpy(self, array):
        return np.asarray(array)

    def training_step_memory(self, config, *, batch, length, reversible):
        from .memory import training_step_memory

        row = training_step_memory(config, batch=batch, length=length, reversible=reversible)
        return {"bytes": row["activation_bytes"], "method": "tracemalloc, peak - gradients"}

    def version(self) -> str:
        return np.__version__


BACKEND = NumpyBackend
