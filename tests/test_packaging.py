"""Packaging metadata that the build reads without complaint."""

from __future__ import annotations

import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def test_the_licence_is_an_spdx_string_that_setuptools_reads_without_a_warning() -> None:
    # Regression: `license = { text = "MIT" }` made every install print about 70 lines
    # of setuptools deprecation warnings. The SPDX string needs setuptools >= 77.
    data = tomllib.loads(PYPROJECT.read_text())
    assert data["project"]["license"] == "MIT"
    assert "setuptools>=77" in data["build-system"]["requires"]
