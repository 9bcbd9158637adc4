"""JAX: the core under ``jax.numpy``, differentiated by ``jax.vjp``, compiled by ``jax.jit``.

JAX implements the Array API standard in ``jax.numpy`` itself, so the core runs on it
unchanged, eagerly and under ``jax.jit`` / ``jax.vmap`` (shapes never depend on data, and
randomness arrives as explicit arrays). The functional model (a ``jax.custom_vjp``
reversible stack, a jit-friendly loss and gradient) lives in ``model.py``, the memory
measurements in ``memory.py``.

float64 needs JAX's x64 mode, which is a process-wide switch this adapter never flips:
set ``JAX_ENABLE_X64=1`` before starting Python (or ``jax.config.update("jax_enable_x64",
True)`` before creating arrays). Without it the backend does not list the ``"float64"``
capability and refuses float64 arrays instead of silently making them float32.
"""

from __future__ import annotations

import warnings

import numpy as np

from .._base import Backend

_PLATFORM_ALIASES = {"cuda": "gpu", "rocm": "gpu"}


def _silence_int64_warnings() -> None:
    # The core asks for int64 indices and bucket ids (the standard's default index dtype).
    # Without x64, JAX makes them int32 and warns at every such call; int32 is exact here as
    # long as num_hashes * length < 2**31 (the sort key is the bucket id alone, see
    # sorting.py), so the warning carries no information for reformer-core's calls. Only this message is silenced,
    # once a JAX backend is made (not when the registry merely reads this module).
    warnings.filterwarnings("ignore", message=r"Explicitly requested dtype int64 requested in .* is not available",
                            category=UserWarning)


class JaxBackend(Backend):
    name = "jax"
    framework = "jax"
    array_modules = ("jax", "jaxlib")  # concrete arrays are jaxlib types, tracers jax types
    extra = "jax"
    autodiff = True
    native_lsh_attention = True  # lsh_kernel.py: a custom_vjp with a recompute backward (Pallas forward on GPU)

    def __init__(self, device=None) -> None:
        _silence_int64_warnings()
        super().__init__(device)

    @property
    def capabilities(self) -> frozenset:  # float64 follows JAX's x64 switch, read at every call
        import jax

        flags = {"autodiff", "bfloat16", "jit", "native-attention"}
        if jax.config.jax_enable_x64:
            flags.add("float64")
        if self.device.platform != "cpu":
            flags.add("gpu")
        return frozenset(flags)

    @property
    def xp(self):
        # jax.numpy is itself an Array API namespace (array-api-compat returns it unwrapped).
        import jax.numpy as jnp

        return jnp

    def devices(self) -> list:
        """The default platform's devices, then the CPU's when the default is an accelerator."""
        import jax

        found = list(jax.devices())
        if found[0].platform != "cpu":
            found += list(jax.devices("cpu"))
        return found

    def parse_device(self, device):
        """A ``jax.Device``, or ``"cpu"``, ``"gpu"`` (also ``"cuda"``), ``"tpu"``, ``"cpu:1"``, ``"gpu:0"``."""
        import jax

        if isinstance(device, jax.Device):
            return super().parse_device(device)
        if not isinstance(device, str):
            raise TypeError(f"a jax device must be a jax.Device or a string such as 'cpu', 'gpu' or 'cpu:1', "
                            f"got {type(device).__name__} {device!r}")
        platform, sep, index_text = device.strip().lower().partition(":")
        platform = _PLATFORM_ALIASES.get(platform, platform)
        if sep and not index_text.isdigit():
            raise ValueError(f"jax device {device!r} must look like 'cpu', 'gpu' or 'cpu:1' (platform:index)")
        index = int(index_text) if sep else 0
        try:
            candidates = jax.devices(platform)
        except RuntimeError:  # JAX's answer for a platform it has no backend for
            candidates = []
        if index >= len(candidates):
            raise ValueError(
                f"backend 'jax' has no device {device!r}; available: {[str(d) for d in self.devices()]} "
                f"(for several CPU devices set XLA_FLAGS=--xla_force_host_platform_device_count=N before "
                f"importing jax)"
            )
        return candidates[index]

    def dtype(self, name):
        if isinstance(name, str) and name == "float64":
            self._require_x64("float64")
        return super().dtype(name)

    def _require_x64(self, what: str) -> None:
        import jax

        if not jax.config.jax_enable_x64:
            raise TypeError(
                f"{what} needs JAX's x64 mode, which is off; set JAX_ENABLE_X64=1 before starting Python "
                f"(reformer-core never changes JAX's global configuration), or use dtype='float32'"
            )

    def from_numpy(self, array, *, dtype=None):
        import jax

        host = np.asarray(array)
        if dtype is not None:
            target = self.dtype(dtype)
            host = host.astype(np.dtype(target), copy=False)  # ml_dtypes gives NumPy a bfloat16
        elif host.dtype == np.float64:
            self._require_x64("a float64 array")
        if host.dtype.kind in "iu" and host.dtype.itemsize == 8 and not jax.config.jax_enable_x64:
            # Without x64 JAX has no 64-bit integers; cast on the host so it is explicit (token
            # ids and permutation indices fit in int32).
            host = host.astype(np.int32 if host.dtype.kind == "i" else np.uint32)
        return jax.device_put(host, self.device)

    def to_numpy(self, array):
        import jax

        if isinstance(array, jax.core.Tracer):
            # Inside eager jax.vjp/jax.grad an array is a tracer holding its value; stop_gradient
            # gives that value (under jit there is none, and JAX raises its own clear error).
            array = jax.lax.stop_gradient(array)
        return np.array(jax.device_get(array), copy=True)

    def synchronize(self, *arrays) -> None:
        """Wait until ``arrays`` (any pytree leaves) are computed; without arguments, wait for
        JAX's queued effects. JAX dispatches asynchronously, so timings must block on results."""
        import jax

        if arrays:
            jax.block_until_ready(arrays)
        else:
            jax.effects_barrier()

    # ---- differentiation and compilation ----
    def vjp(self, fn, *primals):
        """``jax.vjp``: ``(fn(*primals), pullback)``; primals may be pytrees (dicts, lists,
        tuples), and ``pullback(cotangent)`` returns a tuple of gradients shaped like them."""
        import jax

        if not callable(fn):
            raise TypeError(f"vjp needs a callable, got {type(fn).__name__}")
        return jax.vjp(fn, *primals)

    def stop_gradient(self, array):
        """``jax.lax.stop_gradient``: the value without its autodiff trace."""
        import jax

        return jax.lax.stop_gradient(array)

    def jit(self, fn):
        """``jax.jit(fn)``: ``fn`` must be a pure function of array pytrees."""
        import jax

        return jax.jit(fn)

    def native_full_attention(self, q, k, v, *, causal):
        """``jax.nn.dot_product_attention`` (cuDNN flash attention on GPUs that have it)."""
        import jax
        import jax.numpy as jnp

        def heads_last(x):  # (batch, heads, length, dim) <-> (batch, length, heads, dim)
            return jnp.swapaxes(x, 1, 2)

        return heads_last(jax.nn.dot_product_attention(heads_last(q), heads_last(k), heads_last(v), is_causal=causal))

    @staticmethod
    def lsh_chunk_attention(qk, v, perm, undo, **kwargs):
        """The sorted-chunk step of LSH attention as one ``jax.custom_vjp`` (``lsh_kernel.py``)."""
        from .lsh_kernel import lsh_chunk_attention

        return lsh_chunk_attention(qk, v, perm, undo, **kwargs)

    def compiled_generate(self, params, config, prompt, max_new_tokens, *, temperature, top_k, top_p, eos_token_id,
                          seed, rotations_seed):
        """The decode loop as one ``jax.jit`` call with fixed-size caches (``generate.py``)."""
        from .generate import generate_checked

        return generate_checked(params, config, prompt, max_new_tokens, temperature=temperature, top_k=top_k,
                                top_p=top_p, eos_token_id=eos_token_id, seed=seed, rotations_seed=rotations_seed)

    def training_step_memory(self, config, *, batch, length, reversible):
        from .memory import training_step_memory

        return training_step_memory(self, config, batch=batch, length=length, reversible=reversible)

    def version(self) -> str:
        import jax

        return jax.__version__


BACKEND = JaxBackend
