"""array_api_strict: the minimal standard namespace, proof that the core uses only the standard.

Its extra devices (``device1``, ``device2``) let device-placement mistakes be caught on a CPU.
"""

from __future__ import annotations

import numpy as np

from .._base import Backend


class StrictBackend(Backend):
    name = "strict"
    framework = "array_api_strict"
    array_modules = ("array_api_strict",)
    extra = "test"

    @property
    def capabilities(self) -> frozenset:
        # Its arrays are NumPy buffers underneath, which report to tracemalloc.
        return frozenset({"float64", "devices", "tracemalloc"})

    @property
    def xp(self):
        import array_api_strict

        return array_api_strict

    def devices(self) -> list:
        # 'no_float64' and 'no_x64' are special test devices; keep the general-purpose ones.
        info = self.xp.__array_namespace_info__()
        return [d for d in info.devices() if str(d).split("'")[1] in ("CPU_DEVICE", "device1", "device2")]

    def parse_device(self, device):
        if isinstance(device, str) and not device.startswith("array_api_strict"):
            try:
                device = self.xp.Device(device)
            except ValueError:
                names = [str(d).split("'")[1] for d in self.devices()]
                raise ValueError(f"backend 'strict' has no device {device!r}; available: {names}") from None
        return super().parse_device(device)

    def from_numpy(self, array, *, dtype=None):
        out = self.xp.asarray(np.asarray(array), device=self.device)
        return out if dtype is None else self.xp.astype(out, self.dtype(dtype))

    def to_numpy(self, array):
        # Strict refuses NumPy conversion off its CPU device; bringing data home is the point here.
        return np.from_dlpack(array.to_device(self.xp.Device("CPU_DEVICE")))

    def version(self) -> str:
        return self.xp.__version__


BACKEND = StrictBackend
