"""The JAX backend: the adapter (``adapter.py``), the functional model (``model.py``: a
``jax.custom_vjp`` reversible stack, a jit-friendly loss and gradient), the memory probe
(``memory.py``) and the decode loop of ``reformer_core.generate`` as one ``jax.jit`` call
(``generate.py``: ``from reformer_core.backends.jax.generate import generate``).
``from reformer_core.backends.jax import model`` is the model's module; this package itself
imports no framework.
"""
