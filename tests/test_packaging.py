"""Packaging metadata that the build reads without complaint."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def test_the_licence_is_an_spdx_string_that_setuptools_reads_without_a_warning() -> None:
    # Regression: `license = { text = "MIT" }` made every install print about 70 lines
    # of setuptools deprecation warnings. The SPDX string needs setuptools >= 77.
    data = tomllib.loads(PYPROJECT.read_text())
    assert data["project"]["license"] == "MIT"
    assert "setuptools>=77" in data["build-system"]["requires"]


def test_importing_eventbus_imports_no_optional_dependency() -> None:
    # The exporters' libraries come with the prometheus and otel extras, and only
    # eventbus.prometheus and eventbus.otel import them.
    code = (
        "import sys, eventbus; "
        "print(sorted(m for m in sys.modules "
        "if m.split('.')[0] in ('prometheus_client', 'opentelemetry', 'fastapi')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


def test_each_exporter_has_its_extra() -> None:
    extras = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]
    assert any(d.startswith("prometheus-client") for d in extras["prometheus"])
    assert any(d.startswith("opentelemetry-api") for d in extras["otel"])


def test_the_licence_file_ships_and_no_classifier_contradicts_the_spdx_string() -> None:
    data = tomllib.loads(PYPROJECT.read_text())["project"]
    root = PYPROJECT.parent
    assert data["license-files"] == ["LICENSE"]
    assert (root / "LICENSE").read_text().startswith("MIT License")
    # setuptools refuses "License ::" classifiers beside an SPDX expression.
    assert not [c for c in data["classifiers"] if c.startswith("License ::")]


def test_project_urls_are_real_addresses_or_absent() -> None:
    # No invented home page: a URL is listed only once the project has one.
    urls = tomllib.loads(PYPROJECT.read_text())["project"].get("urls", {})
    for name, url in urls.items():
        assert url.startswith("https://"), name
        assert not any(fake in url for fake in ("example", "TODO", "your-", "<")), url


def test_the_changelog_keeps_an_unreleased_section_first() -> None:
    text = (PYPROJECT.parent / "CHANGELOG.md").read_text()
    headings = [line for line in text.splitlines() if line.startswith("## ")]
    assert headings[0] == "## [Unreleased]"
    assert "keepachangelog.com" in text
