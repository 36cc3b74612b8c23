"""Small types shared by several request bodies."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, StringConstraints


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty or only whitespace")
    return value


NonBlank = Annotated[str, StringConstraints(min_length=1), AfterValidator(_not_blank)]
LineageName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
