"""Side-by-side benchmarks of reformer-core (not installed, not run by the test suite).

``bench/attention.py``: pytest-benchmark micro-benchmarks, ``python -m pytest bench/attention.py``.
The length sweep lives in the installed package: ``reformer-core bench``.
"""
