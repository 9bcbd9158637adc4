"""Backend adapters: one folder per framework, the same file names for the same roles.

``<framework>/adapter.py`` is the adapter (a :class:`Backend` subclass); where a framework has
more, ``nn.py`` / ``model.py`` is its native model and ``memory.py`` its memory probes. The
registry is :data:`ADAPTERS`; each adapter declares its name, framework module, array modules
and extra once, on its class. No module here imports a framework when it is imported.
"""

from ._base import Backend
from .cupy.adapter import CupyBackend
from .jax.adapter import JaxBackend
from .numpy.adapter import NumpyBackend
from .strict.adapter import StrictBackend
from .torch.adapter import TorchBackend

__all__ = ["Backend", "ADAPTERS"]

#: The registered adapters, in the order ``reformer-core info`` lists them.
ADAPTERS: tuple[type[Backend], ...] = (NumpyBackend, StrictBackend, TorchBackend, JaxBackend, CupyBackend)
