"""Where every benchmark script leaves its numbers: a JSON record and, beside it, the markdown table it printed."""

from __future__ import annotations

import json
from pathlib import Path


def save_results(json_path: str | Path, record: dict, markdown: str | None = None) -> Path:
    """Write ``record`` to ``json_path`` and ``markdown`` (when given) to the ``.md`` beside it; returns the path."""
    path = Path(json_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    if markdown is not None:
        path.with_suffix(".md").write_text(markdown + "\n")
    return path
