"""Generated sections of benchmarks/README.md: each script owns the text between its two markers."""

from __future__ import annotations

from pathlib import Path


def replace_section(readme: Path, start: str, end: str, text: str, *, before: str | None = None) -> None:
    """Put ``text`` (which begins with ``start`` and ends with ``end``) in place of the section between
    the markers; a first section goes before the ``before`` marker when that exists, else at the end."""
    current = readme.read_text(encoding="utf-8") if readme.is_file() else ""
    if start in current and end in current:
        head, rest = current.split(start, 1)
        current = head + text.rstrip("\n") + rest.split(end, 1)[1]
    elif before and before in current:
        current = current.replace(before, text + "\n" + before, 1)
    else:
        current = current.rstrip("\n") + "\n\n" + text
    readme.write_text(current, encoding="utf-8")
