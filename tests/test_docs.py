"""The docs name only what exists: flags, files, README sections, links and their anchors.

The kinds of drift this catches: a page citing a file the repository does not have, a flag renamed in
a parser but not in the prose, a pointer to a README section that was retitled, a link whose anchor
moved. What a doc names is read from its code spans, links and quoted section titles.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
SOURCES = sorted(
    p
    for p in [*ROOT.glob("*.py"), *ROOT.glob("*.sh"), *(ROOT / "benchmarks").glob("*"), *(ROOT / "tests").glob("*.py")]
    if p.is_file() and p.suffix in {".py", ".sh"}
)
CODE_SPAN = re.compile(r"`([^`\n]+)`")
LINK = re.compile(r"\]\(([^)\s]+)\)")
# README, then an optional comma or possessive, then a quoted title: a README section named by its title.
README_SECTION = re.compile(r"README(?:'s|,)?\s+\"([^\"]+)\"")
FLAG = re.compile(r"(?<![\w-])--([a-z][a-z0-9_]*[a-z0-9])(?![\w-])")  # ours use underscores, never hyphens
# Names of the project's own files: scripts, and paths under its folders (outputs are not checked).
REPO_FILE = re.compile(r"^(?:(?:[\w.-]+/)*[\w.-]+\.(?:py|sh)|(?:docs|benchmarks|tests|data|\.ci)/[\w./-]+)$")
# Flags of other programs that the docs quote (torchrun, accelerate, sbatch, GNU parallel, ruff), not ours.
OTHER_PROGRAMS_FLAGS = {"nproc_per_node", "nnodes", "num_processes", "array", "dependency", "wrap", "gres", "partition"}
OTHER_PROGRAMS_FLAGS |= {"time", "halt", "help", "quiet", "check"}


def slug(title: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    title = re.sub(r"[`*_]", "", title.strip().lower())
    return re.sub(r"[^\w\- ]", "", title).replace(" ", "-")


def headings(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return [line.lstrip("#").strip() for line in text.splitlines() if re.match(r"#{1,6} ", line)]


def known_flags() -> set[str]:
    flags = set()
    for path in SOURCES:
        flags |= set(FLAG.findall(path.read_text()))
    return flags


def repo_files() -> set[str]:
    tracked = {p.relative_to(ROOT).as_posix() for p in ROOT.rglob("*") if p.is_file() and ".git" not in p.parts}
    return tracked | {Path(p).name for p in tracked}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_links_and_anchors_resolve(doc):
    for target in LINK.findall(doc.read_text()):
        if re.match(r"[a-z]+:", target):  # http(s), mailto: outside the repository
            continue
        file_part, _, anchor = target.partition("#")
        linked = (doc.parent / file_part).resolve() if file_part else doc
        assert linked.exists(), f"{doc.name} links to {target}, which does not exist"
        if anchor and linked.suffix == ".md":
            assert anchor in {slug(h) for h in headings(linked)}, f"{doc.name}: no section #{anchor} in {linked.name}"


def test_readme_sections_named_anywhere_exist():
    titles = set(headings(ROOT / "README.md"))
    missing = []
    for path in [*DOCS, *SOURCES]:
        text = " ".join(path.read_text().split())  # a title may wrap across lines
        missing += [f'{path.relative_to(ROOT)}: "{t}"' for t in README_SECTION.findall(text) if t not in titles]
    assert not missing, "README sections named but absent: " + "; ".join(sorted(set(missing)))


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_flags_and_files_named_in_docs_exist(doc):
    flags, files = known_flags() | OTHER_PROGRAMS_FLAGS, repo_files()
    text = re.sub(r"```.*?```", lambda m: m.group(0).replace("`", ""), doc.read_text(), flags=re.S)
    blocks = re.findall(r"```.*?```", doc.read_text(), flags=re.S)
    problems = [
        f"--{flag}" for span in CODE_SPAN.findall(text) + blocks for flag in FLAG.findall(span) if flag not in flags
    ]
    for span in CODE_SPAN.findall(text):
        name = span.strip()
        if REPO_FILE.match(name) and not re.search(r"[*{}<>]|\.\.\.", name):
            if name not in files and Path(name).name not in files:
                problems.append(name)
    assert not problems, (
        f"{doc.relative_to(ROOT)} names what the project does not have: {', '.join(sorted(set(problems)))}"
    )
