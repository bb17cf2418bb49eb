"""Document structure: Markdown (or plain text) split into sections of blocks; YAML front matter."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_FENCE_OPEN = re.compile(r"^ {0,3}(`{3,}|~{3,})(.*)$")
_ATX = re.compile(r"^ {0,3}(#{1,6})(?:[ \t]+(.*?))?[ \t]*$")
_ATX_CLOSING = re.compile(r"(?:^|[ \t]+)#+[ \t]*$")
_SETEXT = re.compile(r"^ {0,3}(=+|-+)[ \t]*$")
# A paragraph that starts as a list item or quote cannot become a setext heading ("- a\n---" is a rule).
_LIST_OR_QUOTE = re.compile(r"^ {0,3}(?:[-*+][ \t]|\d{1,9}[.)][ \t]|>)")
# CommonMark HTML blocks of kinds 1-5 (raw tags, comments, processing instructions, declarations, CDATA):
# they end at a line holding their end marker, not at a blank line, and nothing inside them is Markdown,
# so a fence or "#" inside a multi-line comment must not open a code block or a heading.
_HTML_BLOCKS = (
    (re.compile(r"^ {0,3}<(?:script|pre|style|textarea)(?:[\s>]|$)", re.I), re.compile(r"</(?:script|pre|style|textarea)>", re.I)),
    (re.compile(r"^ {0,3}<!--"), re.compile(r"-->")),
    (re.compile(r"^ {0,3}<\?"), re.compile(r"\?>")),
    (re.compile(r"^ {0,3}<![A-Za-z]"), re.compile(r">")),
    (re.compile(r"^ {0,3}<!\[CDATA\["), re.compile(r"\]\]>")),
)


@dataclass
class Block:
    kind: str  # "prose" | "heading" | "code"
    text: str  # prose / heading text; for code the lines between the fences
    fence_open: str = ""
    fence_close: str = ""


@dataclass
class Section:
    level: int
    heading: str | None
    path: list[str]
    blocks: list[Block] = field(default_factory=list)


def _fence_closes(line: str, fence: str) -> bool:
    stripped = line.strip()
    # Up to 3 spaces of indent, same fence character, at least as long, nothing after it.
    return (
        len(line) - len(line.lstrip(" ")) <= 3
        and len(stripped) >= len(fence)
        and set(stripped) == {fence[0]}
    )


def _html_block_end(line: str) -> re.Pattern | None:
    """The end marker of the HTML block `line` opens, or None when it opens none (or closes it itself)."""
    for start, end in _HTML_BLOCKS:
        match = start.match(line)
        if match:
            return None if end.search(line, match.end()) else end
    return None


def parse_markdown(text: str) -> list[Section]:
    """Split a Markdown document into sections (text before the first heading is section 0).

    HTML blocks (comments included) are kept as text, uninterpreted, up to their end marker."""
    sections = [Section(level=0, heading=None, path=[])]
    trail: list[tuple[int, str]] = []
    paragraph: list[str] = []
    fence: str | None = None
    fence_open = ""
    code_lines: list[str] = []
    html_end: re.Pattern | None = None

    def flush_paragraph() -> None:
        if paragraph:
            sections[-1].blocks.append(Block("prose", "\n".join(paragraph)))
            paragraph.clear()

    def open_section(level: int, title: str) -> None:
        while trail and trail[-1][0] >= level:
            trail.pop()
        trail.append((level, title))
        section = Section(level=level, heading=title, path=[t for _, t in trail])
        section.blocks.append(Block("heading", "#" * level + " " + title if title else "#" * level))
        sections.append(section)

    for line in text.split("\n"):
        if fence is not None:
            if _fence_closes(line, fence):
                sections[-1].blocks.append(Block("code", "\n".join(code_lines), fence_open, line.strip()))
                fence, code_lines = None, []
            else:
                code_lines.append(line)
            continue
        if html_end is not None:  # inside an HTML block: text, not Markdown, until its end marker
            if html_end.search(line):
                html_end = None
            if line.strip():
                paragraph.append(line)
            else:
                flush_paragraph()
            continue
        html_end = _html_block_end(line)
        if html_end is not None:
            paragraph.append(line)
            continue
        match = _FENCE_OPEN.match(line)
        if match and not (match.group(1)[0] == "`" and "`" in match.group(2)):
            flush_paragraph()
            fence, fence_open = match.group(1), line.strip()
            continue
        match = _ATX.match(line)
        if match:
            flush_paragraph()
            title = _ATX_CLOSING.sub("", match.group(2) or "").strip()
            open_section(len(match.group(1)), title)
            continue
        match = _SETEXT.match(line)
        if match and paragraph and not _LIST_OR_QUOTE.match(paragraph[0]):
            title = " ".join(p.strip() for p in paragraph)
            paragraph.clear()
            open_section(1 if match.group(1)[0] == "=" else 2, title)
            continue
        if not line.strip():
            flush_paragraph()
            continue
        paragraph.append(line)
    if fence is not None:  # unclosed fence runs to the end of the document (CommonMark); close it in the chunk
        sections[-1].blocks.append(Block("code", "\n".join(code_lines), fence_open, fence))
    flush_paragraph()
    return sections


def parse_plain_text(text: str, title: str) -> list[Section]:
    blocks = [Block("prose", para.strip("\n")) for para in re.split(r"\n[ \t]*\n", text) if para.strip()]
    return [Section(level=0, heading=title, path=[title], blocks=blocks)]


def strip_front_matter(text: str) -> tuple[str, str | None]:
    """YAML front matter (`---` ... `---`) is document metadata, not text to embed."""
    if not text.startswith("---\n"):
        return text, None
    end = re.search(r"^(?:---|\.\.\.)[ \t]*$", text[4:], flags=re.MULTILINE)
    if end is None:
        return text, None
    return text[4 + end.end():].lstrip("\n"), text[4:4 + end.start()].rstrip("\n")
