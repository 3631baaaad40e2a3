"""The front page and the manual: every relative link in README.md and docs/ resolves (the file,
and the heading an anchor names, as GitHub makes anchors), the README stays a front page, and
nothing in them works only on this project's own test machines."""
from __future__ import annotations

import re
from pathlib import Path

from conftest import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")


def anchors(page: Path) -> set[str]:
    """GitHub's anchors for a page's headings (code blocks skipped): lower case, punctuation
    dropped but for - and _, spaces as -; a repeated heading gets -1, -2."""
    found, seen, fenced = set(), {}, False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        if fenced or not re.match(r"^#{1,6} ", line):
            continue
        slug = re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        found.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return found


def links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # examples in code blocks are not links
    return [a or b for a, b in LINK.findall(text)]


def test_every_relative_link_resolves():
    broken = []
    for page in PAGES:
        for target in links(page):
            if re.match(r"^[a-z]+:", target):  # https:, mailto:: not this repository's
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.relative_to(REPO)}: {target} (no such file)")
            elif anchor and file.suffix == ".md" and anchor not in anchors(file):
                broken.append(f"{page.relative_to(REPO)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_the_readme_is_a_front_page():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    first_screen = "\n".join(readme.splitlines()[:40])
    assert "make demo" in first_screen and "make test" in first_screen
    for page in PAGES:  # what only this project's own test machines have
        text = page.read_text()
        assert ".device/" not in text and "/tmp/site" not in text and "dali-device" not in text, page


def test_the_measured_tables_are_the_result_files():
    """No number in a generated table is typed by hand: each is what `python -m benchmarks.docs`
    writes from docs/results/ (and a result file edited by hand would show in its own diff)."""
    from benchmarks import docs

    stale = [str(page.relative_to(REPO)) for page in docs.PAGES if docs.rewritten(page.read_text()) != page.read_text()]
    assert not stale, f"run python -m benchmarks.docs: {stale}"
    assert "<!-- generated: status -->" in (REPO / "README.md").read_text()
