"""The JAX backend: the adapter (``adapter.py``), the functional model (``model.py``: a
``jax.custom_vjp`` reversible stack, a jit-friendly loss and gradient) and the memory probe
(``memory.py``). ``from reformer_core.backends.jax import model`` is the model's module; this
package itself imports no framework.
"""
