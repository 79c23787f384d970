"""The documentation: the MkDocs site builds strictly (no broken link, anchor or nav entry), and the README stays a
short entry point."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import REPO

README_MAX_LINES = 250


def test_the_readme_has_at_most_250_lines():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move reference material into docs/."


def test_the_docs_site_builds_strictly_without_writing_into_the_repository(tmp_path):
    pytest.importorskip("mkdocs", reason="mkdocs is not installed: pip install -e '.[docs]' (or '.[dev]')")
    before = sorted(path.name for path in REPO.iterdir())
    site = tmp_path / "site"
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(REPO / "mkdocs.yml"), "--site-dir", str(site)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},  # Material's end-of-life notice, not a problem of these docs
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert (site / "index.html").is_file() and (site / "benchmarks" / "index.html").is_file()
    assert sorted(path.name for path in REPO.iterdir()) == before
