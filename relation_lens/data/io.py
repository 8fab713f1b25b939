"""The one JSON / JSON-lines reader of the data modules and the CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from relation_lens.errors import DataError


def read_json(path: str | Path, *, lines: bool | None = None) -> Any:
    """The content of a JSON file, or the list of rows of a JSON-lines file.

    Args:
        lines: ``True`` for JSON lines, ``False`` for one JSON document, ``None`` to decide by the
            suffix (``.jsonl``) or, failing that, by whether the file parses as one document.

    Raises:
        DataError: the file is missing or not valid JSON (naming the file and the line).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {str(path)!r} as UTF-8 text ({exc})") from None
    if lines is None:
        lines = path.suffix == ".jsonl"
        if not lines:
            try:
                return json.loads(text)
            except json.JSONDecodeError:
                if len([l for l in text.splitlines() if l.strip()]) < 2:
                    raise DataError(f"{str(path)!r} is not valid JSON") from None
                lines = True
    if not lines:
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{str(path)!r} is not valid JSON ({exc})") from None
    rows = []
    for i, line in enumerate(text.splitlines()):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"{str(path)!r} line {i + 1} is not valid JSON ({exc})") from None
    return rows
