"""LSH, local and full attention: forward and gradients."""

from hypothesis import given

from .components import run_check
from .settings import conformance_settings
from .strategies import attention_cases


@conformance_settings()
@given(case=attention_cases())
def test_lsh_attention(target, dtype, case):
    run_check("lsh_attention", target, dtype, case)


@conformance_settings()
@given(case=attention_cases())
def test_local_attention(target, dtype, case):
    run_check("local_attention", target, dtype, case)


@conformance_settings()
@given(case=attention_cases())
def test_full_attention(target, dtype, case):
    run_check("full_attention", target, dtype, case)
