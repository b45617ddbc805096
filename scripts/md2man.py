#!/usr/bin/env python3
"""Render docs/ markdown as a man page, so that the manuals and the docs have one source.

    scripts/md2man.py --all OUTDIR          # every page of MANPAGES (the package build)
    scripts/md2man.py --name authd --section 8 docs/man/authd.8.md docs/operations.md

The first file is the page's own source: its `# name(N) — summary` line becomes `.TH` and the
NAME section, its `##` headings the sections (`.SH`). In the files that follow (the reference
docs), `# title` becomes a section and `##`/`###` a subsection (`.SS`). It knows the markdown the docs use, and no more:
paragraphs, fenced code, bullet lists, pipe tables (for tbl), `code`, **bold**, *italic*,
[links](target) (the text is kept) and HTML comments (dropped). A build-time tool, stdlib
only, so that building the package needs no pandoc.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# page -> its sources: the page's own (docs/man/) first, then the reference docs it carries.
MANPAGES = {
    "authd.8": ["docs/man/authd.8.md", "docs/operations.md"],
    "authctl.1": ["docs/man/authctl.1.md"],
    "authd.toml.5": ["docs/man/authd.toml.5.md", "docs/configuration.md", "docs/lockout.md", "docs/handlers.md"],
}
_INLINE = [
    (re.compile(r"\*\*(.+?)\*\*"), "\\\\fB\\1\\\\fR"),
    (re.compile(r"(?<![\w*])\*(?!\s)(.+?)(?<!\s)\*(?![\w*])"), "\\\\fI\\1\\\\fR"),
    (re.compile(r"\[([^\]]+)\]\([^)]*\)"), r"\1"),
]
_CODE = re.compile(r"`([^`]+)`")
_TABLE_RULE = re.compile(r"^\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?$")


def escape(text: str) -> str:
    """Roff-escape plain text: backslashes, dashes (a `-` is a hyphen in roff), non-ASCII."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "".join(c if ord(c) < 128 else f"\\[u{ord(c):04X}]" for c in text)


def inline(text: str) -> str:
    """Markdown inline markup to roff fonts; code spans are protected from the other rules."""
    codes: list[str] = []

    def stash(match: re.Match[str]) -> str:
        codes.append(match.group(1))
        return f"\0{len(codes) - 1}\0"

    text = escape(_CODE.sub(stash, text))
    for pattern, replacement in _INLINE:
        text = pattern.sub(replacement, text)
    return re.sub(r"\0(\d+)\0", lambda m: f"\\fB{escape(codes[int(m.group(1))])}\\fR", text)


def line_safe(text: str) -> str:
    """A roff text line must not start with a control character."""
    return "\\&" + text if text[:1] in (".", "'") else text


def cells(row: str) -> list[str]:
    """A table row's cells; `\\|` is a literal bar, as GitHub reads it."""
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", row.strip().strip("|"))]


def table(rows: list[str]) -> list[str]:
    """A pipe table as tbl input; the last column (the prose) and long phrases wrap in text blocks."""
    header, body = cells(rows[0]), [cells(r) for r in rows[2:]]
    last = len(header) - 1
    formats = [" ".join("lb" for _ in header), " ".join("lx" if i == last else "l" for i in range(len(header))) + "."]
    out = [".TS", "allbox tab(\t);", *formats, "\t".join(inline(c) for c in header)]
    for row in body:
        row = (row + [""] * len(header))[: len(header)]
        out.append("\t".join(_cell(c, wrap=i == last or " " in c and len(c) > 30) for i, c in enumerate(row)))
    return out + [".TE"]


def _cell(text: str, *, wrap: bool) -> str:
    """A text block wraps (prose); a plain cell (a key, a value) sets its column's width."""
    return f"T{{\n{line_safe(inline(text))}\nT}}" if wrap else inline(text)


def render(name: str, section: str, sources: list[Path]) -> str:
    out = ["'\\\" t", f'.TH "{name.upper()}" "{section}" "" "authd" "authd manual"']
    first = True
    for n, path in enumerate(sources):
        lines = re.sub(r"<!--.*?-->", "", path.read_text(encoding="utf-8"), flags=re.S).splitlines()
        i = 0
        while i < len(lines):
            line = lines[i]
            if line.startswith("```"):
                end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
                out += [".PP", ".nf", ".RS 4", *(line_safe(escape(code)) for code in lines[i + 1 : end]), ".RE", ".fi"]
                i = end + 1
                continue
            if heading := re.match(r"^(#+)\s+(.*)$", line):
                level, title = len(heading.group(1)), heading.group(2)
                if first and level == 1:  # `# name(N) — what it is`: the NAME section
                    first = False
                    out += [".SH NAME", f"{escape(name)} \\- {inline(title.split(' — ', 1)[-1])}"]
                else:
                    level -= n == 0  # in the man page's own source, `##` are its sections
                    macro = ".SH" if level <= 1 else ".SS"
                    out.append(f'{macro} "{inline(title).upper() if level <= 1 else inline(title)}"')
                i += 1
                continue
            if line.startswith("|") and i + 1 < len(lines) and _TABLE_RULE.match(lines[i + 1]):
                end = i
                while end < len(lines) and lines[end].startswith("|"):
                    end += 1
                out += table(lines[i:end])
                i = end
                continue
            if bullet := re.match(r"^[-*]\s+(.*)$", line):
                item = [bullet.group(1)]
                i += 1
                while i < len(lines) and lines[i].startswith("  ") and lines[i].strip():
                    item.append(lines[i].strip())
                    i += 1
                out += [".IP \\(bu 2", line_safe(inline(" ".join(item)))]
                continue
            if not line.strip():
                i += 1
                continue
            para = [line.strip()]
            i += 1
            while i < len(lines) and lines[i].strip() and not re.match(r"^(#|```|\||[-*]\s)", lines[i]):
                para.append(lines[i].strip())
                i += 1
            out += [".PP", line_safe(inline(" ".join(para)))]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--all", type=Path, metavar="OUTDIR", help="write every page of MANPAGES there")
    parser.add_argument("--name")
    parser.add_argument("--section")
    parser.add_argument("sources", nargs="*", type=Path)
    args = parser.parse_args(argv)
    if args.all:
        args.all.mkdir(parents=True, exist_ok=True)
        for page, sources in MANPAGES.items():
            name, section = page.rsplit(".", 1)
            (args.all / page).write_text(render(name, section, [ROOT / s for s in sources]), encoding="ascii")
        return 0
    if not (args.name and args.section and args.sources):
        parser.error("--name, --section and sources (or --all OUTDIR)")
    sys.stdout.write(render(args.name, args.section, args.sources))
    return 0


if __name__ == "__main__":
    sys.exit(main())
