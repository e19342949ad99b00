"""Every ```python block in README.md and docs/*.md runs (in order, one namespace per page) from a
temporary directory outside the repository, with nothing added to ``sys.path``, as a user runs it;
blocks preceded by the line ``<!-- not-run -->`` are skipped."""

import glob
import os
import re
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
BLOCK = re.compile(r"(<!-- not-run -->\s*\n)?```python\n(.*?)```", re.S)


def blocks(path):
    with open(path) as f:
        text = f.read()
    return [code for skip, code in BLOCK.findall(text) if not skip]


def test_docs_have_code():
    assert PAGES and all(blocks(p) for p in PAGES)


@pytest.mark.parametrize("page", PAGES, ids=os.path.basename)
def test_page_runs(page, monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if os.path.abspath(p or os.curdir) != ROOT])
    for name in [m for m in sys.modules if m == "recipes" or m.startswith("recipes.")]:
        monkeypatch.delitem(sys.modules, name)
    namespace = {"__name__": "__docs__"}
    for i, code in enumerate(blocks(page)):
        try:
            exec(compile(code, f"{os.path.basename(page)}[block {i}]", "exec"), namespace)
        except Exception as e:
            raise AssertionError(f"{os.path.basename(page)} block {i} failed: {type(e).__name__}: {e}\n{code}") from e
