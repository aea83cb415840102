"""The layering of the conversion, read from the source (every import, module level or inside a
function): the calibration never imports the surgery that consumes its statistics, a head plan
depends on no other part of the conversion, and scripts reach only public names (research included)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def imports(path: Path) -> list[tuple[str, str]]:
    """(module, name) of every import in a file; name is "" for `import module`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, "") for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found += [(node.module, alias.name) for alias in node.names]
    return found


def test_calibration_never_imports_surgery():
    files = sorted((ROOT / "gqa_convert" / "calibration").glob("*.py"))
    assert files
    wrong = [(f.name, m) for f in files for m, _ in imports(f) if m.startswith("gqa_convert.surgery")]
    assert not wrong, wrong


def test_a_head_plan_depends_on_no_other_part_of_the_conversion():
    found = {module for module, _ in imports(ROOT / "gqa_convert" / "surgery" / "plan.py")}
    ours = {module for module in found if module.startswith("gqa_convert")}
    assert ours == {"gqa_convert.arch"}, ours


@pytest.mark.parametrize(
    "script", sorted((ROOT / "scripts").rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT / "scripts"))
)
def test_scripts_use_only_public_names(script):
    private = [
        (module, name)
        for module, name in imports(script)
        if module.startswith("gqa_convert")
        and (any(part.startswith("_") for part in module.split(".")) or name.startswith("_"))
    ]
    assert not private, private
