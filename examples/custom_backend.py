"""Verify a custom backend: subclass the Backend protocol, then run the conformance suite on it.

A backend is an adapter class (``reformer_core.backends.Backend``): its name, the framework it
needs, its array namespace, devices, and the conversions to and from NumPy; everything else
has a default. This one is NumPy restricted to float32 (no ``"float64"`` capability), so the
suite checks it in float32 only. Third-party adapters are named by import path,
``"module:ClassName"``, anywhere a backend name goes (``--backends``, ``use_backend``).

    python examples/custom_backend.py              # a forward call, then the suite (~20 s)
    python examples/custom_backend.py --max-examples 20
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

import reformer_core as rc
from reformer_core.backends import Backend


class Float32NumpyBackend(Backend):
    """NumPy arrays, float32 only."""

    name = "numpy-float32"
    framework = "numpy"
    array_modules = ("numpy",)
    extra = None

    @property
    def capabilities(self) -> frozenset:
        return frozenset()  # no "float64": the suite tests float32 only

    @property
    def xp(self):
        from array_api_compat import numpy as compat_numpy

        return compat_numpy

    def devices(self) -> list:
        return ["cpu"]

    def from_numpy(self, array, *, dtype=None):
        out = np.array(array, copy=True)
        if dtype is None and out.dtype == np.float64:
            out = out.astype(np.float32)
        return out if dtype is None else out.astype(self.dtype(dtype), copy=False)

    def to_numpy(self, array):
        return np.asarray(array)

    def version(self) -> str:
        return np.__version__


SPEC = "custom_backend:Float32NumpyBackend"  # how the suite (a subprocess) imports the class


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-examples", type=int, default=2, help="hypothesis examples per check (default 2)")
    args = parser.parse_args(argv)

    # 1. use it like any backend: parameters and rotations are created on it
    with rc.use_backend(SPEC) as backend:
        print(f"backend {backend.name}: {backend.describe()}")
        qk = backend.from_numpy(np.random.default_rng(0).standard_normal((1, 2, 64, 16)))
        rotations = rc.random_rotations(0, 2, 16, num_hashes=2, num_buckets=4, like=qk)
        out = rc.lsh_attention(qk, qk, rotations, num_buckets=4, chunk_length=16, causal=True)
        print(f"lsh_attention: {out.shape} {out.dtype}")

    # 2. the conformance suite against the float64 NumPy oracle (runs pytest in a subprocess,
    #    which imports this file as the module `custom_backend`)
    from reformer_core.conformance.check import format_table, run_suite, summarise

    here = os.path.dirname(os.path.abspath(__file__))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))
    completed, rows = run_suite(SPEC, max_examples=args.max_examples)
    if not rows:
        print(completed.stdout[-3000:], completed.stderr[-3000:], sep="\n", file=sys.stderr)
        print("no comparisons ran", file=sys.stderr)
        return 2
    print(format_table(summarise(rows)))
    print(f"{len(rows)} comparisons, pytest exit status {completed.returncode}")
    return completed.returncode


if __name__ == "__main__":
    sys.exit(main())
