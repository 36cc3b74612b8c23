"""The deploy tests reuse the API fixture (a real app on a real database)."""

from tests.service.conftest import api  # noqa: F401
