"""The NumPy backend: the reference oracle (``adapter.py``) and its exact memory probe (``memory.py``)."""
