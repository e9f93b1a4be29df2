"""Packaging metadata that the build reads without complaint."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
import venv
import zipfile
from pathlib import Path

import msgspec
import pytest

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The project built into a wheel as pip builds it for an install (setuptools in
    an isolated environment), and everything the build printed."""
    out = tmp_path_factory.mktemp("wheel")
    # Built from a copy of the checkout (its links kept as links) without what
    # earlier builds and runs left there: what a fresh clone builds, and the
    # checkout stays as it was.
    source = out / "source"
    shutil.copytree(
        PYPROJECT.parent,
        source,
        symlinks=True,
        ignore=shutil.ignore_patterns(
            ".git",
            ".venv",
            "build",
            "site",
            "*.egg-info",
            "__pycache__",
            ".*_cache",
            ".hypothesis",
            ".benchmarks",
            ".coverage*",
            "*.db*",
        ),
    )
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(source)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    (wheel,) = out.glob("eventbus-*.whl")
    return wheel, proc.stdout + proc.stderr


def test_the_licence_is_an_spdx_string_that_setuptools_reads_without_a_warning(
    built: tuple[Path, str],
) -> None:
    # Regression: `license = { text = "MIT" }` made every install print about 70 lines
    # of setuptools deprecation warnings. The SPDX string needs setuptools >= 77.
    data = tomllib.loads(PYPROJECT.read_text())
    assert data["project"]["license"] == "MIT"
    assert "setuptools>=77" in data["build-system"]["requires"]
    _, output = built
    assert "Warning" not in output, output  # pip -q still shows the backend's warnings
    assert "deprecated" not in output, output


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


def test_the_wheel_installs_only_eventbus_beside_an_apps_own_storage_package(
    tmp_path: Path, built: tuple[Path, str]
) -> None:
    """The repository keeps ``storage/`` and ``backpressure/`` at the top, but the wheel
    ships them inside ``eventbus``: an application with its own ``storage`` and
    ``backpressure`` packages (common names) imports all three, and pip installs the
    ``eventbus`` command, which tells its version."""
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    wheel, _ = built
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        (metadata_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        metadata = archive.read(metadata_name).decode()
    tops = {name.split("/")[0] for name in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"eventbus"}
    # The linked foundations are in it as files, with their type marker.
    assert "eventbus/storage/_sqlite.py" in names
    assert "eventbus/backpressure/py.typed" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), names
    assert "License-Expression: MIT" in metadata
    for classifier in project["classifiers"]:
        assert f"Classifier: {classifier}" in metadata

    # A fresh environment: the wheel (pip installing into it from outside, as
    # `pip --python` does), the dependencies of this one, the app's own packages.
    env = tmp_path / "env"
    venv.create(env, with_pip=False)
    (site,) = env.glob("lib/python*/site-packages")
    installed = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(env / "bin" / "python"),
            "install",
            "-q",
            "--no-deps",
            "--no-index",
            str(wheel),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert installed.returncode == 0, installed.stderr
    deps = Path(msgspec.__file__).parent.parent  # this environment's site-packages
    (site / "deps.pth").write_text(f"{deps}\n")
    app = tmp_path / "app"
    for package in ("storage", "backpressure"):
        (app / package).mkdir(parents=True)
        (app / package / "__init__.py").write_text("WHOSE = 'the app'\n")
    script = (
        "import asyncio, storage, backpressure, eventbus\n"
        "from eventbus import Bus\n"
        "assert storage.WHOSE == 'the app', storage\n"
        "assert backpressure.WHOSE == 'the app', backpressure\n"
        f"assert eventbus.__file__.startswith({str(site)!r}), eventbus.__file__\n"
        "async def main():\n"
        "    async with Bus.open('events.db') as bus:\n"  # the SQLite log, on a file
        "        print((await bus.publish('t', {'n': 1})).seq)\n"
        "asyncio.run(main())\n"
    )
    ran = subprocess.run(
        [str(env / "bin" / "python"), "-c", script],
        cwd=app,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.strip() == "1"
    # The command pip installed, run from the app's directory too.
    version = subprocess.run(
        [str(env / "bin" / "eventbus"), "--version"],
        cwd=app,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == f"eventbus {project['version']}"
