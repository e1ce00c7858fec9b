"""The README and docs/ link to each other; every relative link must lead to a file and heading that exist."""

from __future__ import annotations

import glob
import os
import re

import pytest
from helpers.commands import REPO_ROOT

DOCUMENTS = [os.path.join(REPO_ROOT, "README.md"), *sorted(glob.glob(os.path.join(REPO_ROOT, "docs", "*.md")))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def heading_anchors(path: str) -> set[str]:
    """GitHub's anchors of a markdown file's headings: lower case, punctuation dropped, spaces to dashes."""
    anchors = set()
    for line in open(path, encoding="utf-8"):
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return anchors


@pytest.mark.parametrize("document", DOCUMENTS, ids=[os.path.relpath(d, REPO_ROOT) for d in DOCUMENTS])
def test_every_relative_link_resolves(document):
    broken = []
    for target in LINK.findall(open(document, encoding="utf-8").read()):
        if re.match(r"^[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        resolved = os.path.normpath(os.path.join(os.path.dirname(document), path)) if path else document
        if not os.path.exists(resolved):
            broken.append(f"{target}: no such file")
        elif anchor and anchor not in heading_anchors(resolved):
            broken.append(f"{target}: no heading #{anchor}")
    assert broken == []


def test_the_readme_is_a_guide_not_a_notebook():
    """A quarter of its 36 KB when this was decided; results and design live in docs/."""
    assert os.path.getsize(os.path.join(REPO_ROOT, "README.md")) < 12_000
