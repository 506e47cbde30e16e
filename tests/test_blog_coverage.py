"""docs/blog-map.md is the coverage table blog section -> hvlab unit -> notebook cell; it must stay true.

Every hvlab object it links must exist (and be on an API page, so the site can link it), every notebook it names
must exist and hold the quoted cell text, every row must name an hvlab unit or say why it is missing, and every
section of the blog must have a row.
"""
from __future__ import annotations

import importlib
import re
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
MAP = ROOT / "docs" / "blog-map.md"
BLOG = ROOT.parent.parent / "shared" / "seed" / "hunyuanvideo-blog.md"  # beside the checkout when present
# The blog's numbered sections (its headings "## 1 前言" ... "#### 3.4.3 混元主干网络").
BLOG_SECTIONS = ["1", "2.1", "2.2.1", "2.2.2", "2.2.3", "2.3", "3.1", "3.2", "3.3", "3.4.1", "3.4.2", "3.4.3"]

REF = re.compile(r"\[`?[^\]]+?`?\]\[([\w.]+)\]")  # [`name`][hvlab.module.attr]
NB = re.compile(r"\[(\d+[a-z]?)\]\((notebooks/[\w]+\.ipynb)\)(?:: \"([^\"]+)\")?")
PAGE = re.compile(r"\]\(([\w/.-]+\.md)\)")


def rows() -> list[list[str]]:
    out = []
    for line in MAP.read_text().splitlines():
        if line.startswith("| ") and not line.startswith("| Blog") and not line.startswith("| ---"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]
            assert len(cells) == 4, f"blog-map row without 4 columns: {line[:80]}"
            out.append(cells)
    return out


def resolve(target: str):
    parts = target.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                raise AttributeError(f"{target}: {'.'.join(parts[:cut])} has no {attr!r}")
            obj = getattr(obj, attr)
        return ".".join(parts[:cut])
    raise ImportError(f"{target}: no importable module")


def api_modules() -> set[str]:
    found = set()
    for page in (ROOT / "docs" / "api").glob("*.md"):
        found |= set(re.findall(r"^:::\s+([\w.]+)", page.read_text(), re.M))
    return found


def cell_texts(path: Path) -> list[str]:
    return [c.source for c in nbformat.read(path, as_version=4).cells]


def test_the_table_has_rows_and_covers_every_blog_section():
    table = rows()
    assert len(table) >= 30
    covered = {s.strip() for r in table for s in r[0].split(",")}
    assert not [s for s in BLOG_SECTIONS if s not in covered], f"blog sections without a row: {covered}"
    if BLOG.exists():  # the list above is the blog's own numbering
        heads = re.findall(r"^#{2,4} (\d+(?:\.\d+)*) ", BLOG.read_text(), re.M)
        assert set(BLOG_SECTIONS) <= set(heads), sorted(set(BLOG_SECTIONS) - set(heads))
        # the other headings only group these (2, 2.2, 3, 3.4) or split 2.1 into its two set-up methods
        assert all(any(s.startswith(h + ".") for s in BLOG_SECTIONS) or h.startswith("2.1.")
                   for h in heads if h not in BLOG_SECTIONS), heads


@pytest.mark.parametrize("row", rows(), ids=lambda r: f"{r[0]} {r[1][:40]}")
def test_row_links_resolve(row):
    section, item, unit, cell = row
    refs = REF.findall(unit) + REF.findall(cell)
    missing = "**missing**" in unit
    pages = PAGE.findall(unit)
    assert refs or pages or missing, f"row {section} {item[:40]!r} names no hvlab unit and does not say it is missing"
    if missing:
        reason = unit.split("**missing**", 1)[1].lstrip(":, ")
        assert len(reason.split()) >= 5, f"row {section} {item[:40]!r}: 'missing' needs a reason, got {reason!r}"
    api = api_modules()
    for target in refs:
        module = resolve(target)
        assert module in api or target in api, f"{target} is not on an API page (docs/api/*.md '::: {module}')"
    for page in pages:
        assert (ROOT / "docs" / page).is_file(), f"row {section}: docs/{page} does not exist"
    notebooks = NB.findall(cell)
    if not notebooks:
        assert cell.startswith("—"), f"row {section} {item[:40]!r}: no notebook cell and no dash"
    for number, path, anchor in notebooks:
        nb = ROOT / "docs" / ".." / path
        assert nb.is_file(), f"row {section}: {path} does not exist"
        assert Path(path).name.startswith(number), f"row {section}: link text {number} for {path}"
        assert anchor, f"row {section}: {path} needs the quoted text of the cell it points to"
        assert any(anchor in text for text in cell_texts(nb)), f"row {section}: no cell of {path} contains {anchor!r}"
