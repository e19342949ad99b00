"""Every ```python block in docs/*.md runs (in order, one namespace per page), except blocks
preceded by the line ``<!-- not-run -->``."""

import glob
import os
import re
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
BLOCK = re.compile(r"(<!-- not-run -->\s*\n)?```python\n(.*?)```", re.S)


def blocks(path):
    with open(path) as f:
        text = f.read()
    return [code for skip, code in BLOCK.findall(text) if not skip]


def test_docs_have_code():
    assert PAGES and all(blocks(p) for p in PAGES)


@pytest.mark.parametrize("page", PAGES, ids=os.path.basename)
def test_page_runs(page, monkeypatch, capsys):
    monkeypatch.syspath_prepend(ROOT)
    monkeypatch.chdir(ROOT)
    namespace = {"__name__": "__docs__"}
    for i, code in enumerate(blocks(page)):
        try:
            exec(compile(code, f"{os.path.basename(page)}[block {i}]", "exec"), namespace)
        except Exception as e:
            raise AssertionError(f"{os.path.basename(page)} block {i} failed: {type(e).__name__}: {e}\n{code}") from e
