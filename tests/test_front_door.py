"""The front door stays true: a short README that shows the two commands, links and
anchors that resolve, the docs/paper.md the code cites, and a Keep a Changelog file
whose newest release is the package version."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import ood_audit

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", REPO / "CHANGELOG.md", REPO / "examples" / "README.md",
         REPO / "benchmarks" / "README.md", *sorted((REPO / "docs").glob("*.md"))]
#: Pages generated from the code by their own tooling (a test there keeps them current);
#: a link to one is checked when the page exists.
GENERATED = {REPO / "docs" / "cli.md", REPO / "docs" / "detectors.md"}
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.*)$", text, flags=re.M)}


def links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return [m.group(1) for m in LINK.finditer(text)]


def test_readme_is_a_short_front_door():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 150
    for needle in ("make demo", "make test", "ood-audit train --model glow --data fashionmnist",
                   "ood-audit score --ood mnist", "ood-audit decompose", "ood-audit report --gate"):
        assert needle in text, needle
    figure = re.search(r"!\[[^\]]*\]\(([^)]+\.png)\)", text)
    assert figure, "the README shows the paradox in a figure"
    png = REPO / figure.group(1)
    assert png.is_file() and png.stat().st_size < 200_000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_and_anchors_resolve(page):
    assert page.is_file()
    for target in links(page):
        if re.match(r"^[a-z]+:", target) or target.startswith("<"):
            continue  # absolute URLs
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if dest in GENERATED and not dest.exists():
            continue
        assert dest.exists(), f"{page.name}: {target} -> {dest} does not exist"
        if anchor and dest.suffix == ".md":
            assert anchor in anchors(dest), f"{page.name}: #{anchor} is not a heading of {dest.name}"


def test_docs_hold_the_reference_pages():
    for name in ("paper", "usage", "data", "scores-schema", "performance", "results", "architecture"):
        assert (REPO / "docs" / f"{name}.md").is_file(), name
    readme = (REPO / "README.md").read_text()
    for name in ("paper", "cli", "detectors", "data", "scores-schema", "performance", "results",
                 "architecture"):
        assert f"docs/{name}.md" in readme, name


def test_paper_md_cited_by_the_code_exists_with_its_points():
    paper = (REPO / "docs" / "paper.md").read_text()
    numbered = {int(n) for n in re.findall(r"^(\d+)\. \*\*", paper, flags=re.M)}
    assert "## Conventions" in paper
    cited = 0
    for module in (REPO / "ood_audit").rglob("*.py"):
        for m in re.finditer(r"paper\.md,? (?:point|item) (\d+)", module.read_text()):
            cited += 1
            assert int(m.group(1)) in numbered, f"{module}: point {m.group(1)} not in docs/paper.md"
    assert cited >= 3


def test_changelog_is_keep_a_changelog_with_the_package_version_on_top():
    text = (REPO / "CHANGELOG.md").read_text()
    releases = re.findall(r"^## \[([^\]]+)\](?: - (\d{4}-\d{2}-\d{2}))?$", text, flags=re.M)
    headings = re.findall(r"^## .*$", text, flags=re.M)
    assert len(releases) == len(headings), "every release heading is '## [X.Y.Z] - YYYY-MM-DD'"
    assert releases[0] == ("Unreleased", "")
    versions = [v for v, date in releases[1:] if date]
    assert len(versions) == len(releases) - 1
    assert versions[0] == ood_audit.__version__
    as_tuples = [tuple(int(x) for x in v.split(".")) for v in versions]
    assert as_tuples == sorted(as_tuples, reverse=True)
    allowed = {"Added", "Changed", "Deprecated", "Removed", "Fixed", "Security"}
    assert set(re.findall(r"^### (.*)$", text, flags=re.M)) <= allowed
    for line in text.splitlines():  # one line per change: no wrapped entries
        assert not re.match(r"^\s+\S", line), f"continuation line: {line!r}"
