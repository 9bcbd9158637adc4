"""Reading and writing models: reformer-core checkpoints (private; re-exported by ``reformer_core``)."""
