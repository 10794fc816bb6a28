"""Model tests: the networks here are tiny (see the one_thread fixture in tests/conftest.py)."""

import pytest


@pytest.fixture(autouse=True, scope="module")
def _models_use_one_thread(one_thread):
    yield
