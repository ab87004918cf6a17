"""Prints a fenced code block of the README, so CI runs the README's commands as written.

    python .ci/readme_block.py README.md "Install and run" bash [--commands]

prints the first ```bash block under the heading "Install and run" (any level, up to the
next heading of the same or a higher level). With --commands, one shell command per line:
lines continued with a backslash are joined, blank and comment-only lines dropped. Exits
with status 1, saying why, when there is no such heading or block.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path


def block(text: str, heading: str, lang: str) -> str:
    """The first ```lang block in the section of `text` titled `heading`."""
    lines = text.splitlines()
    headings = []  # (line index, level, title), outside fenced blocks (a '# comment' is none)
    fenced = False
    for i, line in enumerate(lines):
        if line.startswith("```"):
            fenced = not fenced
        m = None if fenced else re.match(r"(#+)\s+(.*?)\s*$", line)
        if m:
            headings.append((i, len(m.group(1)), m.group(2)))
    found_at = [k for k, (_, _, title) in enumerate(headings) if title == heading]
    if not found_at:
        raise LookupError(f"no heading {heading!r}")
    first, level, _ = headings[found_at[0]]
    start, end = first + 1, len(lines)
    for i, lvl, _ in headings[found_at[0] + 1 :]:
        if lvl <= level:
            end = i
            break
    section = "\n".join(lines[start:end]) + "\n"
    found = re.search(rf"^```{re.escape(lang)}\n(.*?)^```", section, flags=re.M | re.S)
    if found is None:
        raise LookupError(f"no ```{lang} block under the heading {heading!r}")
    return found.group(1)


def commands(code: str) -> list[str]:
    """The shell commands of a block, one per item, continuation lines joined."""
    joined = re.sub(r"\\\n", " ", code)
    return [ln for ln in joined.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def main(argv: list[str]) -> int:
    args = [a for a in argv if a != "--commands"]
    if len(args) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    path, heading, lang = args
    try:
        code = block(Path(path).read_text(), heading, lang)
    except LookupError as exc:
        print(f"{path}: {exc}", file=sys.stderr)
        return 1
    if "--commands" not in argv:
        print(code, end="")
        return 0
    found = commands(code)
    if not found:
        print(f"{path}: the ```{lang} block under {heading!r} holds no command", file=sys.stderr)
        return 1
    print("\n".join(found))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
