"""Marked sections of a generated Markdown file (BENCHMARKS.md), replaced in place by the scripts that own them."""

from __future__ import annotations

import pathlib
import re


def replace_section(path: pathlib.Path, name: str, body: str, *, title: str, header: str) -> None:
    """Replaces the ``name`` section of ``path`` (between ``<!-- name:begin -->`` and ``<!-- name:end
    -->``), keeping the rest of the file.

    A missing section is appended under ``## title`` (unless that heading already exists); a missing
    file is created starting with ``header``.
    """
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = path.read_text() if path.exists() else header
    block = f"{begin}\n{body}\n{end}"
    if begin in text:
        text = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        heading = f"## {title}"
        text = text.rstrip() + ("\n\n" if heading in text else f"\n\n{heading}\n\n") + block + "\n"
    path.write_text(text)
