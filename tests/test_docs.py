"""The documentation against the repository and the product: every path and link it names exists (and
every anchor is a heading of its page), the README opens with its two set-up commands and stays short,
the quick start's commands and flags are the CLI's own, and the Python API page's imports work."""

from __future__ import annotations

import glob
import importlib
import re
from pathlib import Path

import pytest
import typer.main
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
# paths written from the repository root start with one of these
TOP_LEVEL = ("docs/", "scripts/", "tests/", "configs/", "gqa_convert/")
TOP_FILES = ("README.md", "CHANGELOG.md", "pyproject.toml")

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"`([^`\n]+)`")


def markdown_links(text: str) -> list[str]:
    """Link targets outside code (a link inside a code block is text)."""
    return LINK.findall(FENCE.sub("", text))


def repository_paths(text: str) -> list[str]:
    """Repository paths named in code spans and code blocks: words starting with a top-level folder,
    or a top-level file; trailing punctuation dropped."""
    words = []
    for code in [*CODE_SPAN.findall(FENCE.sub("", text)), *FENCE.findall(text)]:
        words += [word.strip(".,;:()'\"") for word in code.split()]
    return [word for word in words if word.startswith(TOP_LEVEL) or word in TOP_FILES]


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces as dashes."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {slug(line.lstrip("#")) for line in FENCE.sub("", page.read_text()).splitlines() if line.startswith("#")}


def test_the_helpers_find_paths_links_and_anchors():
    """The extraction itself, on text written for it: a broken regex would make the checks below empty."""
    text = "See [a](docs/x.md#part) and `scripts/y.py --flag`.\n```bash\npython tests/z.py corpus/\n```\n"
    assert markdown_links(text) == ["docs/x.md#part"]
    assert repository_paths(text) == ["scripts/y.py", "tests/z.py"]
    assert slug("Planning a run: `--dry-run`") == "planning-a-run---dry-run"
    assert slug("tokenize: speed against the tokenizer's own batched encode") == (
        "tokenize-speed-against-the-tokenizers-own-batched-encode"
    )


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_every_link_and_anchor_exists(page):
    links = markdown_links(page.read_text())
    missing = []
    for target in links:
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            missing.append(target)
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            missing.append(f"{target} (no such heading)")
    assert not missing, f"{page.name}: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_every_repository_path_exists(page):
    missing = [path for path in repository_paths(page.read_text()) if not glob.glob(str(ROOT / path))]
    assert not missing, f"{page.name}: {missing}"


def test_the_pages_link_to_each_other():
    """The README reaches every page of docs/, so none is lost; the checks above have work to do."""
    linked = {target.partition("#")[0] for target in markdown_links(README.read_text())}
    pages = {f"docs/{page.name}" for page in (ROOT / "docs").glob("*.md")}
    assert pages - linked == set()
    assert "CHANGELOG.md" in linked
    assert len(repository_paths((ROOT / "docs" / "benchmarks.md").read_text())) >= 8  # each figure's script


def test_readme_is_short_and_opens_with_the_two_commands():
    lines = README.read_text().splitlines()
    assert len(lines) <= 250
    opening = "\n".join(lines[:20])
    assert "bash scripts/demo.sh" in opening and "bash scripts/test.sh" in opening


def quick_start() -> list[list[str]]:
    """The words of each `gqa-convert` line of the README's quick start (comments dropped)."""
    section = README.read_text().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = FENCE.findall(section)[0]
    return [line.split("#")[0].split() for line in block.splitlines() if line.startswith("gqa-convert ")]


def test_the_quick_start_names_real_commands_and_flags():
    from gqa_convert.cli import app

    commands = typer.main.get_command(app).commands
    lines = quick_start()
    named = {words[1] for words in lines}
    assert named >= {"inspect", "pool", "recipes", "tokenize", "uptrain", "plot", "eval", "expand", "bench"}
    assert {"--dry-run", "--tasks"} <= {word for words in lines for word in words}
    runner = CliRunner()
    for words in lines:
        name = words[1]
        assert name in commands, f"gqa-convert {name} is not a command"
        flags = {flag for param in commands[name].params for flag in (*param.opts, *param.secondary_opts)}
        unknown = [word for word in words[2:] if word.startswith("-") and word not in flags]
        assert not unknown, f"gqa-convert {name}: {unknown} are not its flags"
    for name in sorted(named):
        result = runner.invoke(app, [name, "--help"])
        assert result.exit_code == 0, f"gqa-convert {name} --help: {result.output}"
        assert "Usage" in result.output


def python_api_imports() -> list[str]:
    text = (ROOT / "docs" / "python-api.md").read_text()
    blocks = [block for block in FENCE.findall(text) if block.startswith("```python")]
    lines = [line for block in blocks for line in block.splitlines()]
    return [line for line in lines if line.startswith(("from gqa_convert", "import gqa_convert"))]


def test_the_python_api_page_imports_work():
    imports = python_api_imports()
    assert len(imports) >= 10  # one or more per section of the page
    for line in imports:
        exec(line, {})  # an ImportError names the line


def test_the_python_api_table_names_real_functions():
    """Dotted names on the page (`gqa_convert.evaluation.evaluate(...)`) resolve to objects."""
    text = (ROOT / "docs" / "python-api.md").read_text()
    dotted = set(re.findall(r"`(gqa_convert(?:\.\w+)+)", text))
    assert len(dotted) >= 10
    for name in dotted:
        parts = name.split(".")
        for split in range(len(parts), 0, -1):  # the longest importable module, then attributes
            try:
                found = importlib.import_module(".".join(parts[:split]))
            except ModuleNotFoundError:
                continue
            for attribute in parts[split:]:
                assert hasattr(found, attribute), f"{name}: no {attribute}"
                found = getattr(found, attribute)
            break
        else:
            pytest.fail(f"{name} is not importable")
