"""A pytest plugin for the GPU session's tests step: stop starting tests once NEOX_PYTEST_DEADLINE (seconds since
the epoch) has passed, so the session ends in time and its JUnit XML holds every test that ran (a run killed
at its timeout writes none). `python -m pytest -p bench.pytest_deadline ...`; unset, it does nothing."""

import os
import time

import pytest


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item, nextitem):
    deadline = os.environ.get("NEOX_PYTEST_DEADLINE")
    if deadline and time.time() > float(deadline):
        item.session.shouldstop = f"the GPU session's deadline for its tests step passed ({deadline})"
        return True  # not run, and no test after it
    return None
