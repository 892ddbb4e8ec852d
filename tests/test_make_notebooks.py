"""scripts/make_notebooks.py: MyST notebooks become valid, Colab-ready, stable .ipynb files."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import types
from pathlib import Path

import nbformat
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "make_notebooks.py"

CODE_CELLS = ["import math\nx = math.sqrt(2)", "print(x * x)"]
NOTEBOOK_SOURCE = f"""\
---
jupytext:
  text_representation:
    extension: .md
    format_name: myst
    format_version: 0.13
    jupytext_version: 1.16.4
kernelspec:
  display_name: Python 3
  language: python
  name: python3
---

# A tiny chapter

Some prose with $x^2$ maths.

```{{code-cell}} ipython3
{CODE_CELLS[0]}
```

```{{code-cell}} ipython3
:tags: [hide-input]

{CODE_CELLS[1]}
```
"""
PLAIN_PAGE = "# Notes\n\nA plain page, not a notebook.\n\n```python\nprint('not a cell')\n```\n"


@pytest.fixture(scope="module")
def make_notebooks() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("make_notebooks", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def book(tmp_path: Path) -> Path:
    """A repository root with one MyST notebook and one plain page."""
    root = tmp_path / "book"
    (root / "chapters" / "basics").mkdir(parents=True)
    (root / "chapters" / "basics" / "tiny.md").write_text(NOTEBOOK_SOURCE, encoding="utf-8")
    (root / "chapters" / "basics" / "notes.md").write_text(PLAIN_PAGE, encoding="utf-8")
    return root


def test_notebook_is_valid_with_colab_cell_first(make_notebooks, book, capsys):
    assert make_notebooks.main(["--root", str(book)]) == 0

    path = book / "chapters" / "basics" / "tiny.ipynb"
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    first, *rest = notebook.cells
    assert first.cell_type == "code"
    assert first.metadata["tags"] == ["colab-install"]
    assert '"google.colab" in sys.modules' in first.source
    assert [cell.source for cell in rest if cell.cell_type == "code"] == CODE_CELLS
    assert rest[0].cell_type == "markdown" and rest[0].source.startswith("# A tiny chapter")
    assert rest[-1].metadata["tags"] == ["hide-input"]
    assert all(cell.outputs == [] and cell.execution_count is None
               for cell in notebook.cells if cell.cell_type == "code")
    assert notebook.metadata["kernelspec"]["name"] == "python3"
    assert "jupytext" not in notebook.metadata
    assert capsys.readouterr().out.splitlines() == [f"wrote {path}"]


def test_plain_pages_are_skipped(make_notebooks, book):
    make_notebooks.main(["--root", str(book)])
    assert sorted(p.name for p in book.rglob("*.ipynb")) == ["tiny.ipynb"]


def test_install_cell_installs_only_on_colab(make_notebooks, monkeypatch):
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda *args, **kwargs: calls.append(args[0]))
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    exec(make_notebooks.INSTALL_SOURCE, {})
    assert calls == []

    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    exec(make_notebooks.INSTALL_SOURCE, {})
    assert len(calls) == 1
    assert calls[0][1:4] == ["-m", "pip", "install"]
    assert "llminfer @ git+https://github.com/llminfer/llminfer@notebooks" in calls[0]


def test_out_keeps_relative_paths(make_notebooks, book, tmp_path):
    out = tmp_path / "out"
    assert make_notebooks.main(["--root", str(book), "--out", str(out)]) == 0
    assert [p.relative_to(out) for p in out.rglob("*.ipynb")] == [
        Path("chapters/basics/tiny.ipynb")
    ]
    assert not list(book.rglob("*.ipynb"))


def test_output_is_byte_identical_across_runs(book, tmp_path):
    # Separate processes, so nothing cached in one interpreter can hide randomness.
    path = tmp_path / "out" / "chapters" / "basics" / "tiny.ipynb"
    outputs = []
    for _ in range(2):
        subprocess.run([sys.executable, str(SCRIPT), "--root", str(book),
                        "--out", str(tmp_path / "out")], check=True, capture_output=True)
        outputs.append(path.read_bytes())
    assert outputs[0] == outputs[1]


def test_check_reports_missing_and_stale_notebooks(make_notebooks, book, capsys):
    source = book / "chapters" / "basics" / "tiny.md"
    assert make_notebooks.main(["--root", str(book), "--check"]) == 1
    assert not list(book.rglob("*.ipynb"))

    make_notebooks.main(["--root", str(book)])
    assert make_notebooks.main(["--root", str(book), "--check"]) == 0

    source.write_text(NOTEBOOK_SOURCE.replace("print(x * x)", "print(x)"), encoding="utf-8")
    capsys.readouterr()
    assert make_notebooks.main(["--root", str(book), "--check"]) == 1
    assert "out of date" in capsys.readouterr().out
