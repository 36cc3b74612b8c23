"""Small types shared by several request bodies."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, StringConstraints


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty or only whitespace")
    # No database stores NUL in text (PostgreSQL refuses it): refuse it here, as a 422.
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return value


NonBlank = Annotated[str, StringConstraints(min_length=1), AfterValidator(_not_blank)]
# Names end up in object keys, file names and log lines: plain ASCII, no separators.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
LineageName = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]
DatasetName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")]
# Free text that is stored in a column (not sealed): no control characters.
PLAIN_TEXT_PATTERN = r"^[^\x00-\x1f\x7f]*$"
