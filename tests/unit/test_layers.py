"""The house rules of DESIGN.md §2 on imports: `core/` imports nothing from the rest of the
package, `store/` only `core/` (and itself). Read from the source, lazy imports included."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "postroom"


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return {n for n in names if n == "postroom" or n.startswith("postroom.")}


@pytest.mark.parametrize(("room", "allowed"), [
    ("core", ("postroom.core",)),
    ("store", ("postroom.core", "postroom.store")),
])
def test_a_room_imports_only_what_the_design_allows(room: str, allowed: tuple[str, ...]
                                                    ) -> None:
    files = sorted((PACKAGE / room).rglob("*.py"))
    assert files
    wrong = {f"{path.relative_to(PACKAGE)}: {name}" for path in files
             for name in _imports(path)
             if not any(name == a or name.startswith(a + ".") for a in allowed)}
    assert not wrong, sorted(wrong)
