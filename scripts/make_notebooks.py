"""Write Colab-ready `.ipynb` notebooks from the book's MyST-Markdown notebooks.

Chapters, labs and exercises are written as MyST Markdown (`.md` with `{code-cell}`):
they diff well and the book builds from them. Colab and Binder open only `.ipynb`, and
Colab has no `llminfer`, so each generated notebook starts with a cell that installs it
there and does nothing anywhere else. The output has no outputs, no timestamps and fixed
cell ids, so regenerating an unchanged source gives the same bytes.

    python scripts/make_notebooks.py             # X.ipynb beside each X.md
    python scripts/make_notebooks.py --out DIR   # DIR/chapters/basics/X.ipynb, ...
    python scripts/make_notebooks.py --check     # write nothing; exit 1 if one is stale
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jupytext
import nbformat

REPO_ROOT = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("book", "chapters", "labs", "exercises")
INSTALL_TAG = "colab-install"
INSTALL_SOURCE = """\
# Colab only: install llminfer (elsewhere, use the project's environment).
import sys, subprocess
if "google.colab" in sys.modules:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q",
                    "llminfer @ git+https://github.com/llminfer/llminfer@notebooks"],
                   check=True)"""


def read_myst_notebook(path: Path) -> nbformat.NotebookNode | None:
    """The notebook in `path`, or None for a plain page (no jupytext MyST front matter)."""
    notebook = jupytext.read(path)
    representation = notebook.metadata.get("jupytext", {}).get("text_representation", {})
    if representation.get("format_name") != "myst" or "kernelspec" not in notebook.metadata:
        return None
    return notebook


def to_ipynb(notebook: nbformat.NotebookNode) -> str:
    """The `.ipynb` text of a MyST notebook, with the Colab install cell first."""
    install = nbformat.v4.new_code_cell(INSTALL_SOURCE, metadata={"tags": [INSTALL_TAG]})
    metadata = {key: value for key, value in notebook.metadata.items() if key != "jupytext"}
    result = nbformat.v4.new_notebook(cells=[install, *notebook.cells], metadata=metadata)
    for index, cell in enumerate(result.cells):
        cell.id = f"cell-{index}"  # nbformat draws random ids; fixed ones keep the bytes stable
    nbformat.validate(result)
    return nbformat.writes(result) + "\n"


def build_notebooks(root: Path, out: Path) -> dict[Path, str]:
    """Map each notebook source under `root` to its `.ipynb` path under `out` and its text."""
    sources = sorted(path for name in SOURCE_DIRS for path in (root / name).rglob("*.md"))
    notebooks = {}
    for source in sources:
        notebook = read_myst_notebook(source)
        if notebook is not None:
            target = (out / source.relative_to(root)).with_suffix(".ipynb")
            notebooks[target] = to_ipynb(notebook)
    return notebooks


def main(argv: list[str] | None = None) -> int:
    """Write (or with --check, compare) every notebook; return the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=REPO_ROOT,
                        help="repository root holding chapters/, labs/, exercises/")
    parser.add_argument("--out", type=Path,
                        help="write under OUT, keeping paths relative to the root "
                             "(default: beside each source)")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if a notebook is missing or out of date")
    args = parser.parse_args(argv)

    stale = 0
    for target, text in build_notebooks(args.root, args.out or args.root).items():
        if args.check:
            if not target.is_file() or target.read_text(encoding="utf-8") != text:
                print(f"out of date: {target}")
                stale += 1
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text, encoding="utf-8", newline="\n")
            print(f"wrote {target}")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
