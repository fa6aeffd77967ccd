"""The suite's own parallel run (run.sh: pytest-xdist, one worker per core, --dist loadgroup): the tests that share
a module-scoped fixture run in one worker, or that fixture (minutes of training for test_interactive's model) is
built again in every worker that gets one of them."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="module")
def built_once() -> str | None:
    return os.environ.get("PYTEST_XDIST_WORKER")


def test_a_test_on_a_module_fixture_is_scheduled_with_its_module(request: pytest.FixtureRequest,
                                                                 built_once: str | None) -> None:
    if not getattr(request.config.option, "loadgroup", False):
        pytest.skip("runs under run.sh's pytest-xdist --dist loadgroup only")
    # what xdist's scheduler groups by: conftest.py's mark turned into this suffix (pytest 9.2 lost it)
    assert request.node.nodeid.endswith("@test_parallel_runs"), request.node.nodeid
