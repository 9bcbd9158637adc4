"""The PyTorch backend: the adapter (``adapter.py``), the framework-native model (``nn.py``:
``ReformerLM``, the reversible ``autograd.Function``) and the memory probes (``memory.py``).

``from reformer_core.backends.torch import ReformerLM`` works; this package itself imports
no framework (the registry looks it up without importing torch), ``nn`` is loaded on first use.
"""

__all__ = ["ReformerLM", "reversible_stack"]


def __getattr__(name):
    if name in __all__:
        from . import nn

        return getattr(nn, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
