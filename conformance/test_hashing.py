"""Hashing and sorting: exact bucket ids (up to rounding ties) and permutations."""

from hypothesis import given

from .components import run_check
from .settings import conformance_settings
from .strategies import attention_cases


@conformance_settings()
@given(case=attention_cases())
def test_hashing(target, dtype, case):
    run_check("hashing", target, dtype, case)


@conformance_settings()
@given(case=attention_cases())
def test_sorting(target, dtype, case):
    run_check("sorting", target, dtype, case)
