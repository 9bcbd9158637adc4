"""The CuPy backend (``adapter.py``, NVIDIA GPUs) and its memory-pool probes (``memory.py``)."""
