"""Beside a notebook: a module named like the grader's notebook reader. If the grader imported this instead of
jupytext, the notebook's answer would be the library's parser (and a marker file would say so)."""


def read(path, *args, **kwargs):
    from pathlib import Path

    Path(path).with_name("SHADOWED_JUPYTEXT").write_text("the grader imported the submission's jupytext.py")
    raise RuntimeError("shadowed")
