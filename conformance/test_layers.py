"""Position-wise layers: the chunked feed-forward block and the embeddings, forward and gradients."""

from hypothesis import given

from .components import run_check
from .settings import conformance_settings
from .strategies import layer_cases


@conformance_settings()
@given(case=layer_cases())
def test_feed_forward(target, dtype, case):
    run_check("feed_forward", target, dtype, case)


@conformance_settings()
@given(case=layer_cases())
def test_embedding(target, dtype, case):
    run_check("embedding", target, dtype, case)
