"""A markdown report in a run folder: headings, text, tables and pictures, written once at the end.

Used by the demo and by every ``difflab experiment``; pictures are written next to ``report.md`` and
linked relatively, so the folder can be moved or committed as it is.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence, Union


def format_cell(v) -> str:
    if isinstance(v, float):
        if v == 0 or 1e-3 <= abs(v) < 1e5:
            return f"{v:.4g}"
        return f"{v:.3e}"
    return str(v)


def markdown_table(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    """A GitHub-markdown table of ``rows`` (dicts) with the given column order (default: first row's keys)."""
    if not rows:
        return "_(no rows)_\n"
    columns = list(columns or rows[0].keys())
    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
    lines += ["| " + " | ".join(format_cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


class Report:
    """Collects markdown blocks for ``out_dir/report.md`` and the numbers for ``out_dir/results.json``."""

    def __init__(self, out_dir: Union[str, Path], title: str):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.blocks = [f"# {title}\n"]
        self.results: dict = {}

    def path(self, name: str) -> Path:
        """Where to write a picture or file called ``name`` inside the report folder."""
        return self.out_dir / name

    def heading(self, text: str, level: int = 2) -> None:
        self.blocks.append(f"{'#' * level} {text}\n")

    def text(self, text: str) -> None:
        self.blocks.append(text.strip() + "\n")

    def image(self, name: str, caption: str = "") -> None:
        self.blocks.append(f"![{caption}]({name})\n" + (f"\n*{caption}*\n" if caption else ""))

    def table(self, rows: Sequence[dict], columns: Iterable[str] | None = None, key: str | None = None) -> None:
        self.blocks.append(markdown_table(rows, list(columns) if columns else None))
        if key:
            self.results[key] = list(rows)

    def write(self) -> Path:
        (self.out_dir / "results.json").write_text(json.dumps(self.results, indent=2, default=float))
        out = self.out_dir / "report.md"
        out.write_text("\n".join(self.blocks))
        return out
