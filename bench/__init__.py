"""Benchmarks and measurements of reformer-core (installed as ``reformer_core.bench``).

``reformer-core bench`` and ``reformer-core train`` run from here:

* ``command.py``: the ``bench`` command's arguments and how it runs;
* ``harness.py``: the side-by-side sweep (backends x lengths x attention kinds x passes),
  including the paper's speed figure (``--speed-figure``): running and timing the rows;
* ``settings.py``: what a run measures (``BenchSettings``, the methods) and its budgets;
* ``targets.py``: backend specs (``+jit``, ``+standard``) and the rows a run plans;
* ``cases.py``: the calls a row times (attention forward and backward, a training step);
* ``results.py``: the report's schema, environment block and columns derived from other rows;
* ``timing.py``: round-robin timing (A B A B), per-row statistics and spread flags, the FLOP
  counting rule and the matmul rate behind GFLOP/s and % of matmul;
* ``threads.py``: ``--threads`` pinning (threadpoolctl, torch, XLA_FLAGS before JAX starts) and
  the oversubscription warnings;
* ``peers.py``: the torch peers (reformer-core with projections, HF transformers,
  reformer-pytorch, SDPA) at the bench's shapes;
* ``report.py``: its tables and plots;
* ``memory.py``: the host memory probes (tracemalloc, sampled RSS);
* ``depth.py``: memory against depth and length (``bench --memory``), asking each backend's
  ``memory.py`` through ``Backend.training_step_memory``;
* ``copy_task.py``: the paper's duplication task and ``reformer-core train``;
* ``torch_attention.py``: torch-only peers (SDPA, HF transformers) at the issue sizes.

``micro/`` (in a checkout, not installed) holds pytest-benchmark micro-benchmarks of the hot
components: ``python -m pytest bench/micro``.
"""
