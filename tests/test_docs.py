"""The documentation a clone gets: a README short enough to read, and no link that leads nowhere.

Relative links in the README and docs/ must name a file of the repository (and, with ``#anchor``,
a heading of that file); nothing may point outside it, e.g. to ``../shared/``, which a clone lacks.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README_MAX_BYTES = 8192

_FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)
_CODE = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REF_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", re.M)
_HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)
_EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)  # http:, https:, mailto:, ...


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "models").glob("*/CHANGELOG.md"))]


def _prose(text: str) -> str:
    """The text without fenced code blocks and inline code, where brackets are not links."""
    return _CODE.sub("", _FENCE.sub("", text))


def links(text: str) -> list[str]:
    prose = _prose(text)
    return [m.group(1) for m in _LINK.finditer(prose)] + [m.group(1) for m in _REF_DEF.finditer(prose)]


def anchors(text: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to '-', repeats numbered."""
    seen: dict[str, int] = {}
    out = set()
    for m in _HEADING.finditer(_FENCE.sub("", text)):
        title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", m.group(1))  # a link in a heading: its text
        slug = re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def broken_links(doc: Path, root: Path = ROOT) -> list[str]:
    """Each relative link of ``doc`` that leaves ``root``, names no file there, or no heading of it."""
    text = doc.read_text(encoding="utf-8")
    problems = []
    if "../shared" in text:
        problems.append("mentions ../shared/, which is not part of the repository")
    for target in links(text):
        if _EXTERNAL.match(target):
            continue
        path, _, anchor = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc.resolve()
        if not dest.is_relative_to(root.resolve()):
            problems.append(f"{target}: outside the repository")
        elif not dest.exists():
            problems.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text(encoding="utf-8")):
            problems.append(f"{target}: no heading #{anchor} in {dest.relative_to(root.resolve())}")
    return problems


def test_readme_is_short() -> None:
    size = (ROOT / "README.md").stat().st_size
    assert size <= README_MAX_BYTES, (
        f"README.md is {size} bytes, over {README_MAX_BYTES}: results and history belong in docs/results.md, "
        "models/<name>/CHANGELOG.md or experiments/")


@pytest.mark.parametrize("doc", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc: Path) -> None:
    assert links(doc.read_text(encoding="utf-8")) or doc.name != "README.md", "README.md has no links at all?"
    problems = broken_links(doc)
    assert not problems, f"{doc.relative_to(ROOT)}:\n" + "\n".join(problems)


def test_link_check_catches_broken_links(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "there.md").write_text("# A heading\n")
    doc = tmp_path / "README.md"
    doc.write_text(
        "[ok](docs/there.md) [ok too](docs/there.md#a-heading) [web](https://example.org/x.md)\n"
        "[gone](docs/missing.md) [bad anchor](docs/there.md#nope) [out](../elsewhere/DESIGN.md)\n"
        "Design: `../shared/DESIGN.md`.\n"
        "```\n[in code](not/checked.md)\n```\n"
    )
    problems = broken_links(doc, root=tmp_path)
    assert any(p.startswith("docs/missing.md") for p in problems)
    assert any(p.startswith("docs/there.md#nope") for p in problems)
    assert any(p.startswith("../elsewhere/DESIGN.md") for p in problems)
    assert any("../shared" in p for p in problems)
    assert len(problems) == 4, problems


def test_anchors_follow_github() -> None:
    text = "# Image quality (`cdae-default:7`)\n## The IOC's fill\n## Speed\n## Speed\n"
    assert anchors(text) == {"image-quality-cdae-default7", "the-iocs-fill", "speed", "speed-1"}
