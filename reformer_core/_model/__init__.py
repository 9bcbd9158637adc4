"""The model without a framework: layers, embeddings, the reversible blocks and stack, the
language model, hand-written VJPs, ``value_and_grad`` and Adam (private; re-exported by
``reformer_core``)."""
