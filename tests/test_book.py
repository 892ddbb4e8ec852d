"""The book's structure: every TOC entry exists, chapters are executable notebooks, listings resolve."""

import ast
import re
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def toc_files() -> list[str]:
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [toc["root"]]
    for part in toc["parts"]:
        files += [chapter["file"] for chapter in part["chapters"]]
    return files


def source(entry: str) -> Path:
    matches = [p for p in (ROOT / f"{entry}.md", ROOT / f"{entry}.ipynb") if p.exists()]
    assert matches, f"_toc.yml lists {entry!r} but no such page exists"
    return matches[0]


def test_every_toc_entry_has_a_page():
    for entry in toc_files():
        source(entry)


def test_every_chapter_is_in_the_toc():
    listed = set(toc_files())
    for folder in ("chapters", "labs", "exercises"):
        for page in (ROOT / folder).rglob("*.md"):
            if page.name == "README.md":
                continue
            assert str(page.relative_to(ROOT).with_suffix("")) in listed, f"{page} is not in _toc.yml"


def test_execution_is_forced_and_errors_fail_the_build():
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    assert config["execute"]["execute_notebooks"] == "force"
    assert config["execute"]["allow_errors"] is False
    assert config["sphinx"]["config"]["nb_execution_raise_on_error"] is True
    assert config["launch_buttons"]["colab_url"] and config["launch_buttons"]["binderhub_url"]


CHAPTERS = sorted(p for p in (ROOT / "chapters").rglob("*.md"))


@pytest.mark.parametrize("page", CHAPTERS, ids=lambda p: p.name)
def test_chapter_is_a_myst_notebook(page):
    text = page.read_text()
    assert text.startswith("---\njupytext:") and "format_name: myst" in text and "kernelspec:" in text
    assert "```{code-cell} ipython3" in text


LISTING = re.compile(r"```\{literalinclude\} (\S+)\n:pyobject: (\S+)")


@pytest.mark.parametrize("page", CHAPTERS, ids=lambda p: p.name)
def test_listings_point_at_existing_objects(page):
    for path, name in LISTING.findall(page.read_text()):
        module = (page.parent / path).resolve()
        assert module.is_file(), f"{page.name}: {path} does not exist"
        tree = ast.parse(module.read_text())
        kinds = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
        defined = {node.name for node in ast.walk(tree) if isinstance(node, kinds)}
        assert name.split(".")[-1] in defined, f"{page.name}: {name} is not defined in {path}"


def test_citations_exist_in_the_bibliography():
    bib = (ROOT / "book" / "references.bib").read_text()
    keys = set(re.findall(r"@\w+\{([^,]+),", bib))
    for page in [*CHAPTERS, *(ROOT / "book").glob("*.md")]:
        for group in re.findall(r"\{cite:[pt]\}`([^`]+)`", page.read_text()):
            for key in group.split(","):
                assert key.strip() in keys, f"{page.name} cites unknown {key!r}"


RECORDED = re.compile(r"benchmarks/results/[\w./-]+\.json")


@pytest.mark.parametrize("page", CHAPTERS, ids=lambda p: p.name)
def test_recorded_results_a_chapter_reads_are_committed(page):
    """A chapter that reads a recorded result needs it in every clone: present, and tracked by git (an
    untracked file passes locally and breaks the book in CI)."""
    paths = sorted(set(RECORDED.findall(page.read_text())))
    for path in paths:
        assert (ROOT / path).is_file(), f"{page.name} reads {path}, which does not exist"
    if paths and (ROOT / ".git").exists():
        tracked = subprocess.run(["git", "ls-files", "--", *paths], cwd=ROOT, capture_output=True, text=True)
        missing = set(paths) - set(tracked.stdout.split())
        assert tracked.returncode == 0 and not missing, f"{page.name} reads {sorted(missing)}, not committed to git"
