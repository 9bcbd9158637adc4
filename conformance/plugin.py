"""pytest plugin (registered as a ``pytest11`` entry point, so it is active wherever
reformer-core is installed): ``--backends`` selects the targets, ``--max-examples`` sizes the
hypothesis runs. It only affects tests that ask for the ``target`` fixture."""

from __future__ import annotations

import os

import pytest

from .targets import ENV_VAR, dtypes_for, make_target, parse_specs, spec_errors

EXAMPLES_ENV = "REFORMER_CONFORMANCE_EXAMPLES"


def pytest_addoption(parser):
    group = parser.getgroup("reformer-core conformance")
    group.addoption("--backends", default=None,
                    help=f"reformer-core conformance: comma-separated backend specs to test (default: ${ENV_VAR} "
                         f"or every installed CPU backend), e.g. numpy,strict,torch,torch:cuda,jax,jax:gpu,cupy,"
                         f"package.module:Adapter")
    group.addoption("--max-examples", type=int, default=None,
                    help=f"reformer-core conformance: hypothesis examples per test (default: ${EXAMPLES_ENV} or 10)")


def pytest_configure(config):
    examples = config.getoption("--max-examples", default=None)
    if examples:
        os.environ[EXAMPLES_ENV] = str(examples)  # read by the suite's settings when its modules load


def pytest_generate_tests(metafunc):
    if "target_spec" in metafunc.fixturenames:
        specs = parse_specs(metafunc.config.getoption("--backends", default=None))
        errors = spec_errors(specs)
        if errors:  # a named backend that can never run here fails the run instead of skipping green
            raise pytest.UsageError("reformer-core conformance: " + "; ".join(errors))
        pairs = [(spec, dtype) for spec in specs for dtype in dtypes_for(spec)]
        metafunc.parametrize("target_spec,dtype", pairs, ids=[f"{s}-{d}" for s, d in pairs])


@pytest.fixture
def target(target_spec):
    """The backend under test (skipped with the reason when it cannot run here)."""
    made, why = make_target(target_spec)
    if made is None:
        pytest.skip(why)
    return made
