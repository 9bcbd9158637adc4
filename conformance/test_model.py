"""The reversible stack (forward, inverse, reversible backward) and the whole model."""

from hypothesis import given

from .components import run_check
from .settings import conformance_settings
from .strategies import model_cases


@conformance_settings(0.5)
@given(case=model_cases())
def test_reversible(target, dtype, case):
    run_check("reversible", target, dtype, case)


@conformance_settings(0.5)
@given(case=model_cases())
def test_model(target, dtype, case):
    run_check("model", target, dtype, case)
