"""BENCHMARKS.md: each benchmark owns one `## ` section and rewrites only that one."""

from __future__ import annotations

from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"


def write_section(section: str, body: str, path: Path = BENCHMARKS) -> None:
    """Replace (or append) the section titled `section` (e.g. '## Probes (issue 3)');
    `body` is the text under the title."""
    text = f"{section}\n\n{body.strip()}\n"
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    start = old.find(section + "\n")
    if start < 0:
        new = old.rstrip() + "\n\n" + text
    else:
        nxt = old.find("\n## ", start + len(section))
        new = old[:start] + text + (old[nxt:] if nxt >= 0 else "")
    path.write_text(new.rstrip() + "\n")
