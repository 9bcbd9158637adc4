"""PyTorch: any device torch has (cpu, cuda:N, mps), gradients from torch.autograd.

The namespace is array-api-compat's torch wrapper; the arrays are plain ``torch.Tensor``.
The native ``nn.Module`` and the reversible ``torch.autograd.Function`` live in ``nn.py``,
the memory measurements in ``memory.py``; this file is only the adapter, shaped like
``numpy/adapter.py``.
"""

from __future__ import annotations

import numpy as np

from reformer_core._tree import tree_leaves, tree_map

from .._base import Backend


class TorchBackend(Backend):
    name = "torch"
    framework = "torch"
    array_modules = ("torch",)
    extra = "torch"
    autodiff = True
    jit_traces_vjp = False  # torch.compile cannot trace torch.autograd.grad
    native_attention_linear_memory = True  # SDPA's flash / memory-efficient kernels, CPU included
    native_lsh_attention = True  # lsh_kernel.py: one autograd.Function, recompute in the backward
    native_layer_ops = True  # layer_ops.py: linear, relu, layer_norm

    @property
    def capabilities(self) -> frozenset:
        # float64 everywhere except Apple's mps, which has no double precision.
        caps = {"bfloat16", "autodiff", "jit", "native-attention"}
        if self.device.type != "mps":
            caps.add("float64")
        if self.device.type in ("cuda", "mps"):
            caps.add("gpu")
        return frozenset(caps)

    @property
    def xp(self):
        from array_api_compat import torch as compat_torch

        return compat_torch

    def devices(self) -> list:
        import torch

        found = [torch.device("cpu")]
        if torch.cuda.is_available():
            found += [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            found.append(torch.device("mps", 0))
        return found

    def parse_device(self, device):
        # Accept "cuda" (the current cuda device, as torch does), "cuda:1", torch.device objects.
        import torch

        try:
            parsed = torch.device(device)
        except (RuntimeError, TypeError):
            raise ValueError(f"backend 'torch' cannot parse device {device!r}; use e.g. 'cpu', 'cuda:0' or 'mps'") \
                from None
        if parsed.type == "cuda" and parsed.index is None and torch.cuda.is_available():
            parsed = torch.device("cuda", torch.cuda.current_device())
        if parsed.type == "mps" and parsed.index is None:
            parsed = torch.device("mps", 0)
        return super().parse_device(parsed)

    def from_numpy(self, array, *, dtype=None):
        import torch

        host = np.asarray(array)
        # torch.from_numpy shares memory and refuses negative strides; copy so the result owns its data.
        out = torch.from_numpy(np.array(host, copy=True)).to(self.device)
        if dtype is not None:
            out = out.to(self.dtype(dtype))
        return out

    def to_numpy(self, array):
        import torch

        if not isinstance(array, torch.Tensor):
            raise TypeError(f"expected a torch.Tensor, got {type(array).__module__}.{type(array).__qualname__}")
        array = array.detach()
        # NumPy has no bfloat16: widen to float32 (exact: every bfloat16 is a float32).
        if array.dtype == torch.bfloat16:
            array = array.to(torch.float32)
        return array.cpu().numpy()

    def synchronize(self, *arrays) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elif self.device.type == "mps":
            torch.mps.synchronize()

    def peak_device_memory(self, fn):
        """Peak bytes the CUDA caching allocator held during ``fn()`` (CUDA devices only)."""
        import torch

        if self.device.type != "cuda":
            return super().peak_device_memory(fn)
        self.synchronize()
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        out = fn()
        self.synchronize()
        del out
        return int(torch.cuda.max_memory_allocated(self.device) - before)

    def vjp(self, fn, *primals):
        """``(fn(*primals), pullback)`` by torch.autograd.

        ``primals`` may be pytrees (dicts, lists, tuples) of tensors; floating leaves are
        differentiated, other leaves (ints, None) get None. ``pullback(cotangent)`` returns a
        tuple shaped like ``primals`` with zeros for leaves ``fn`` does not use. Runs under
        ``torch.enable_grad()``, so it works inside ``torch.no_grad()`` too. The pullback may be
        called once (the graph is freed afterwards, like the hand-written rules' closures).
        """
        import torch

        # No recursive closures here: a function that refers to itself is a reference cycle,
        # and a cycle holding the inputs or the graph keeps a layer's memory alive until the
        # garbage collector happens to run (the reversible backward then grew with depth).
        leaves: list = []
        with torch.enable_grad():
            inputs = tree_map(lambda leaf: _track(leaf, leaves), primals)
            out = fn(*inputs)
        out_leaves = tree_leaves(out)

        def pullback(cotangent):
            cot_leaves = tree_leaves(cotangent)
            if len(cot_leaves) != len(out_leaves):
                raise ValueError(f"cotangent has {len(cot_leaves)} arrays, the output has {len(out_leaves)}")
            pairs = [(o, c) for o, c in zip(out_leaves, cot_leaves) if o.requires_grad]
            grads = [None] * len(leaves)
            if pairs and leaves:
                with torch.enable_grad():
                    grads = torch.autograd.grad([o for o, _ in pairs], leaves, [c for _, c in pairs],
                                                allow_unused=True)
            by_leaf = {id(leaf): torch.zeros_like(leaf) if g is None else g for leaf, g in zip(leaves, grads)}
            return tuple(tree_map(lambda leaf: by_leaf.get(id(leaf)), inputs))

        return tree_map(_detach, out), pullback

    def jit(self, fn):
        """``torch.compile(fn)``: Inductor fuses the core's elementwise work (masks, softmax,
        the round combination) into a few kernels. The first call per input shape compiles
        (tens of seconds on a CPU); autograd differentiates the compiled function."""
        import functools
        import warnings

        import torch

        compiled = torch.compile(fn)

        @functools.wraps(fn)
        def run(*args, **kwargs):
            with warnings.catch_warnings():
                # array_api_compat's namespace helpers are lru_cached; Dynamo traces through them
                # (correct for our pure lookups) and warns once per helper.
                warnings.filterwarnings("ignore", message="Dynamo detected a call to a `functools.lru_cache`")
                return compiled(*args, **kwargs)

        return run

    def native_full_attention(self, q, k, v, *, causal):
        """``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient
        kernels where the device has them)."""
        import torch

        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)

    @staticmethod
    def read_torch_state_dict(path):
        from .hf_io import read_state_dict

        return read_state_dict(path)

    @staticmethod
    def hash_seed_normal(shape, seed, dtype_name):
        from .hf_io import hash_seed_normal

        return hash_seed_normal(shape, seed, dtype_name)

    @staticmethod
    def native_dense(x, weight, bias):
        from .layer_ops import dense

        return dense(x, weight, bias)

    @staticmethod
    def native_relu(x):
        from .layer_ops import relu

        return relu(x)

    @staticmethod
    def native_layer_norm(x, scale, bias, eps):
        from .layer_ops import layer_norm

        return layer_norm(x, scale, bias, eps)

    @staticmethod
    def lsh_chunk_attention(qk, v, perm, undo, **kwargs):
        # CUDA float16/bfloat16/float32 tensors with Triton installed: the Triton kernels
        # (triton_lsh.py); everything else, float64 on CUDA included: the torch-op kernel.
        if qk.device.type == "cuda":
            try:
                from . import triton_lsh
            except ImportError:  # no Triton (or a broken install): the torch-op kernel runs everywhere
                triton_lsh = None
            if triton_lsh is not None and triton_lsh.supports(qk):
                return triton_lsh.lsh_chunk_attention(qk, v, perm, undo, **kwargs)
        from .lsh_kernel import lsh_chunk_attention

        return lsh_chunk_attention(qk, v, perm, undo, **kwargs)

    def training_step_memory(self, config, *, batch, length, reversible):
        from .memory import training_step_memory

        return training_step_memory(self, config, batch=batch, length=length, reversible=reversible)

    def version(self) -> str:
        import torch

        return torch.__version__


def _track(leaf, leaves: list):
    """A floating tensor becomes a fresh leaf requiring grad (appended to ``leaves``); others stay."""
    import torch

    if isinstance(leaf, torch.Tensor) and leaf.is_floating_point():
        leaf = leaf.detach().requires_grad_(True)
        leaves.append(leaf)
    return leaf


def _detach(leaf):
    return leaf.detach() if hasattr(leaf, "detach") else leaf


BACKEND = TorchBackend
