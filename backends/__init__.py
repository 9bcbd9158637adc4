"""Backend adapters, one module per framework, all shaped alike (see ``_base.Backend``).

Modules are imported lazily by ``reformer_core.backend``; importing this package imports
no framework.
"""

from ._base import Backend

__all__ = ["Backend"]
