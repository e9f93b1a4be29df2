"""The documentation keeps up with the code: the generated references cover every
configuration key, command and logger; the API pages every public name; the README
links only to pages that exist. (``make docs``, part of ``make test``, builds the
site with ``--strict``.)"""

from __future__ import annotations

import argparse
import importlib.util
import re
import tomllib
from pathlib import Path
from types import ModuleType

import msgspec
import pytest

import eventbus
from eventbus import BatchPolicy, BreakerPolicy, BusConfig, RetryPolicy
from eventbus._logging import LOGGERS
from eventbus.cli._parser import build_parser

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def _load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("docs_generated", DOCS / "_gen/generated.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gen = _load_generator()


def page(name: str) -> str:
    """A page as the site shows it: its generated parts expanded."""
    return str(gen.expand((DOCS / name).read_text()))


# -- configuration ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "table"),
    [(BusConfig, ""), (BatchPolicy, "batch"), (RetryPolicy, "retry"), (BreakerPolicy, "breaker")],
)
def test_the_configuration_page_lists_every_key_with_its_toml_and_environment_names(
    cls: type[msgspec.Struct], table: str
) -> None:
    text = page("reference/configuration.md")
    heading = "### Top level" if not table else f"### `[{table}]`"
    section = text.split(heading, 1)[1].split("\n### ", 1)[0]
    for field in msgspec.structs.fields(cls):
        assert f"| `{field.name}` |" in section, f"{cls.__name__}.{field.name} is not on the page"
        row = _row(section, field.name)
        if field.name in ("retry_on", "give_up_on"):
            assert "code only" in row
        elif table:
            assert f"`EVENTBUS_{table.upper()}__{field.name.upper()}`" in row
            assert f"`{field.name}` in `[{table}]`" in row
        else:
            assert f"`EVENTBUS_{field.name.upper()}" in row


def _row(section: str, key: str) -> str:
    return next(line for line in section.splitlines() if line.startswith(f"| `{key}` |"))


def test_the_configuration_page_shows_the_defaults_of_the_code() -> None:
    text = page("reference/configuration.md")
    assert "| `max_pending_publishes` | `int` | `10000` |" in text
    assert '| `durability` | `"normal"` \\| `"full"` \\| `"off"` | `"normal"` |' in text
    assert f"| `max_attempts` | `int` | `{RetryPolicy().max_attempts}` |" in text


def test_a_setting_without_a_description_fails_the_reference(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A field added to a config class must be described in its docstring, or the
    # site (and this suite) refuses to build its reference.
    doc = BreakerPolicy.__doc__ or ""
    monkeypatch.setattr(BreakerPolicy, "__doc__", re.sub(r"\n\s+window:[^\n]*", "", doc))
    with pytest.raises(gen.MissingDoc, match=r"BreakerPolicy\.window"):
        gen.config_reference()


def test_the_attributes_of_a_google_docstring_are_read_with_their_continuations() -> None:
    class Sample:
        """One line.

        Attributes:
            first: Its text, which goes on
                over a second line (``code``, :class:`Other`).
            second: Short.

        Afterwards: not an attribute.
        """

    assert gen.attribute_docs(Sample) == {
        "first": "Its text, which goes on over a second line (`code`, `Other`).",
        "second": "Short.",
    }


# -- command line -------------------------------------------------------------------


def _commands(parser: argparse.ArgumentParser, prefix: str) -> dict[str, argparse.ArgumentParser]:
    found = {prefix: parser}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.update(_commands(sub, f"{prefix} {name}"))
    return found


def test_the_command_line_page_shows_every_command_and_option() -> None:
    text = page("reference/cli.md")
    commands = _commands(build_parser(), "eventbus")
    assert len(commands) >= 12
    for prog, parser in commands.items():
        assert f"### `{prog}`" in text or any(p.startswith(prog + " ") for p in commands), (
            f"{prog} is not on the page"
        )
        for action in parser._actions:
            for option in action.option_strings:
                assert option in text, f"{prog} {option} is not on the page"
    assert "--quiet" in text  # dlq redrive's


# -- logging, API, results ----------------------------------------------------------


def test_every_logger_is_named_on_the_site_and_in_the_readme() -> None:
    site = page("guide/observability.md")
    readme = (ROOT / "README.md").read_text()
    for name in LOGGERS:
        assert f"`{name}`" in site
        assert f"`{name}`" in readme


def test_the_api_pages_document_every_public_name() -> None:
    directives = set()
    for path in (DOCS / "api").glob("*.md"):
        directives.update(re.findall(r"^::: (eventbus[\w.]*)$", path.read_text(), re.M))
    missing = [n for n in eventbus.__all__ if f"eventbus.{n}" not in directives]
    assert missing == []
    assert "eventbus.operators" in directives
    assert "eventbus.progress" in directives


def test_recorded_benchmark_results_are_shown_when_there_are_some(tmp_path: Path) -> None:
    assert "`bench/results/`" in gen.bench_results(tmp_path / "missing")
    (tmp_path / "2026-12-throughput.md").write_text("# Throughput\n\n| a | b |\n|---|---|\n")
    (tmp_path / "raw.json").write_text("{}")
    text = gen.bench_results(tmp_path)
    assert "### `2026-12-throughput.md`" in text
    assert "### Throughput" in text  # its own heading, below the file's
    assert "- `bench/results/raw.json`" in text


def test_a_marker_for_no_generated_part_fails_the_build() -> None:
    with pytest.raises(gen.MissingDoc, match="no generated part"):
        gen.expand("<!-- generated: nothing-of-that-name -->\n")


def test_every_marker_in_the_pages_is_expanded() -> None:
    for path in DOCS.rglob("*.md"):
        assert "<!-- generated:" not in gen.expand(path.read_text()), path


# -- the README ---------------------------------------------------------------------


def test_the_readme_links_only_to_files_that_exist() -> None:
    readme = (ROOT / "README.md").read_text()
    targets = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", readme)
    local = [t for t in targets if not t.startswith(("http://", "https://"))]
    assert len(local) > 10
    missing = [t for t in local if not (ROOT / t).exists()]
    assert missing == []


def slug(heading: str) -> str:
    """The anchor MkDocs gives a heading (Python-Markdown's default slugify)."""
    text = re.sub(r"[^\w\s-]", "", heading).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def test_the_readmes_links_into_pages_name_headings_those_pages_have() -> None:
    readme = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\((docs/[^)#]+\.md)#([^)]+)\)", readme)
    assert links
    for target, anchor in links:
        text = page(target.removeprefix("docs/"))
        headings = {slug(h) for h in re.findall(r"^#+ (.+)$", text, re.MULTILINE)}
        assert anchor in headings, f"README links {target}#{anchor}: no such heading"


def test_the_readme_links_every_page_of_the_site_but_the_api_reference() -> None:
    """The site's navigation (mkdocs.yml) and the README's list of pages agree: a
    newcomer reading the README on its own finds every guide."""
    readme = (ROOT / "README.md").read_text()
    nav = re.findall(r"^\s+- [^:]+: (\S+\.md)$", (ROOT / "mkdocs.yml").read_text(), re.M)
    assert "getting-started.md" in nav
    pages = [p for p in nav if not p.startswith("api/") and p not in ("index.md", "changelog.md")]
    documentation = readme.split("## Documentation", 1)[1].split("\n## ", 1)[0]
    unlisted = [p for p in pages if f"](docs/{p})" not in documentation]
    assert unlisted == [], "pages of the site missing from the README's Documentation list"


def test_the_readmes_contents_list_every_section_in_order() -> None:
    readme = (ROOT / "README.md").read_text()
    sections = re.findall(r"^## (.+)$", readme, re.MULTILINE)
    assert sections[0] == "Contents"
    contents = readme.split("## Contents", 1)[1].split("\n## ", 1)[0]
    listed = re.findall(r"^- \[([^\]]+)\]\(#([^)]+)\)$", contents, re.MULTILINE)
    assert [title for title, _ in listed] == sections[1:]
    assert [anchor for _, anchor in listed] == [slug(s) for s in sections[1:]]


def test_the_readme_lists_every_extra() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Installing as a dependency", 1)[1].split("\n## ", 1)[0]
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    extras = pyproject["project"]["optional-dependencies"]
    assert [e for e in extras if f"| `{e}` |" not in section] == []


def test_the_readme_testing_example_is_the_one_the_suite_runs() -> None:
    readme = (ROOT / "README.md").read_text()
    example = (ROOT / "examples/test_handlers.py").read_text()
    section = readme.split("## Testing your handlers", 1)[1]
    block = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert block.strip() in example
