"""What the result types share: a JSON round trip (each defines ``to_dict`` and ``from_dict``)."""

from __future__ import annotations

import json
from pathlib import Path


class JsonRoundTrip:
    def to_json(self, path: str | Path | None = None) -> str:
        """The result as JSON text; also written to ``path`` if given."""
        text = json.dumps(self.to_dict(), indent=1)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_json(cls, text_or_path: str | Path):
        """Read a result back from JSON text or from a file holding it."""
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            text = Path(text_or_path).read_text()
        return cls.from_dict(json.loads(text))
