"""HTML blocks in Markdown: a fence or heading inside a multi-line comment is text, not structure (issue 22.3)."""

from rag_clean.chunking.documents import chunk_markdown
from rag_clean.chunking.markdown import parse_markdown

DOC = (
    "# Setup\n\nInstall it.\n\n"
    "<!-- draft notes\n```bash\nold command\n# Not a heading\n-->\n\n"
    "## Configure\n\nEdit the file.\n\n"
    "# Usage\n\nRun it.\n"
)


def test_fence_inside_a_multiline_comment_does_not_swallow_later_headings():
    rows = chunk_markdown(DOC, "guide.md")
    paths = [tuple(r["section_path"]) for r in rows]
    assert ("Setup", "Configure") in paths and ("Usage",) in paths
    assert ("Setup", "Not a heading") not in paths
    setup = next(r["text"] for r in rows if tuple(r["section_path"]) == ("Setup",))
    assert "<!-- draft notes\n```bash\nold command\n# Not a heading\n-->" in setup
    # Nothing was taken as an unclosed code block: no closing fence was added to any chunk.
    assert sum(r["text"].count("```") for r in rows) == 1


def test_html_block_kinds_end_at_their_marker_not_at_a_blank_line():
    doc = "# A\n\n<pre>\n# inside pre\n\n```\n</pre>\n# B\n\nb text\n"
    sections = parse_markdown(doc)
    assert [s.path for s in sections] == [[], ["A"], ["B"]]
    assert [b.kind for b in sections[1].blocks] == ["heading", "prose", "prose"]


def test_one_line_comment_and_real_fences_behave_as_before():
    doc = "# A\n\n<!-- one line -->\ntext\n\n```\n# code\n```\n\n# B\n\nb\n"
    sections = parse_markdown(doc)
    assert [s.path for s in sections] == [[], ["A"], ["B"]]
    kinds = [(b.kind, b.text) for b in sections[1].blocks]
    assert kinds == [("heading", "# A"), ("prose", "<!-- one line -->\ntext"), ("code", "# code")]
