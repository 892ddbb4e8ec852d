"""A submission folder holding the grader's own module path: if the grader ran this instead of its own, a marker
file would say so."""

if __name__ == "__main__":
    from pathlib import Path

    Path(__file__).with_name("SHADOWED_STUDENT").write_text("the grader ran the submission's student.py")
