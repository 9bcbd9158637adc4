"""CuPy: NumPy's API on NVIDIA GPUs. Trains with the core's hand-written backward rules."""

from __future__ import annotations

import importlib

import numpy as np

from .._base import Backend


class CupyBackend(Backend):
    name = "cupy"
    framework = "cupy"
    array_modules = ("cupy",)
    extra = "cupy"

    @property
    def capabilities(self) -> frozenset:
        return frozenset({"float64", "gpu", "memory"})

    def __init__(self, device=None) -> None:
        self._cupy = importlib.import_module("cupy")
        # Registration and import work without a GPU; making a backend needs one (no silent CPU fallback).
        if self._device_count() == 0:
            raise RuntimeError("backend 'cupy' needs a CUDA device and none is visible")
        super().__init__(device)

    def _device_count(self) -> int:
        try:
            return int(self._cupy.cuda.runtime.getDeviceCount())
        except self._cupy.cuda.runtime.CUDARuntimeError:
            return 0

    @property
    def xp(self):
        from array_api_compat import cupy as compat_cupy

        return compat_cupy

    def devices(self) -> list:
        return [self._cupy.cuda.Device(i) for i in range(self._device_count())]

    def parse_device(self, device):
        # Accept 0, "0", "cuda:0", "gpu:0" and cupy.cuda.Device objects.
        if isinstance(device, str):
            text = device.split(":", 1)[1] if ":" in device else device
            if not text.isdigit():
                raise ValueError(f"backend 'cupy' takes devices like 'cuda:0', got {device!r}")
            device = int(text)
        if isinstance(device, int):
            if not 0 <= device < self._device_count():
                raise ValueError(f"backend 'cupy' has no device {device}; {self._device_count()} visible")
            return self._cupy.cuda.Device(device)
        return super().parse_device(device)

    def from_numpy(self, array, *, dtype=None):
        with self.device:
            out = self._cupy.asarray(np.asarray(array))
            return out if dtype is None else out.astype(self.dtype(dtype), copy=False)

    def to_numpy(self, array):
        return self._cupy.asnumpy(array)

    def synchronize(self, *arrays) -> None:
        self.device.synchronize()

    def peak_device_memory(self, fn) -> int:
        from .memory import pool_peak

        return pool_peak(self, fn)

    def memory_in_use(self) -> int:
        """Bytes held by CuPy's default memory pool (what the benchmark reports as device memory)."""
        return int(self._cupy.get_default_memory_pool().used_bytes())

    def training_step_memory(self, config, *, batch, length, reversible):
        from .memory import training_step_memory

        return training_step_memory(self, config, batch=batch, length=length, reversible=reversible)

    def version(self) -> str:
        return self._cupy.__version__


BACKEND = CupyBackend
