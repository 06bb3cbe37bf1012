"""Unit-test fixtures: upstreams are mocked with ``responses``."""

import pytest
import responses


@pytest.fixture
def upstream():
    """A ``responses`` mock that every upstream call of the test goes to."""
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield mock
