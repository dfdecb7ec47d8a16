"""The package's layout as the README draws it: module sizes, and imports that run one way only."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "triton_ema"


def modules() -> dict[str, Path]:
    """Top-level module name -> file (``kernels`` stands for the whole sub-package)."""
    out = {p.stem: p for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    out["kernels"] = PACKAGE / "kernels"
    return out


def public_names() -> dict[str, str]:
    """Name exported by ``triton_ema/__init__.py`` -> the module it comes from."""
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    return {
        a.asname or a.name: node.module.split(".")[1]
        for node in tree.body
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("triton_ema.")
        for a in node.names
    }


def runtime_imports(path: Path) -> set[str]:
    """The package's top-level modules that ``path`` imports at run time (lazy imports included)."""
    files = sorted(path.glob("*.py")) if path.is_dir() else [path]
    found: set[str] = set()
    for f in files:
        tree = ast.parse(f.read_text())
        typing_only = {
            id(n)
            for node in ast.walk(tree)
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for stmt in node.body
            for n in ast.walk(stmt)
        }
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("triton_ema"):
                parts = node.module.split(".")
                if len(parts) > 1:
                    found.add(parts[1])
                else:  # the package's public names, imported from the modules that define them
                    found.update(public_names().get(a.name, a.name) for a in node.names)
            elif isinstance(node, ast.Import):
                found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("triton_ema."))
    own = path.name if path.is_dir() else path.stem
    return found - {own}


def readme_layers() -> list[tuple[list[str], set[str]]]:
    """The README's import table: (modules on the line, modules they may import), top to bottom."""
    text = (ROOT / "README.md").read_text()
    block = text.split("Imports run one way", 1)[1].split("```", 2)[1]
    rows = []
    for line in block.strip().splitlines():
        if "->" in line:
            left, right = line.split("->")
            rows.append(([m.strip() for m in left.split(",")], set(re.findall(r"[a-z_]+", right))))
        else:
            left = line.split(":")[0]
            rows.append(([m.strip() for m in left.split(",")], set()))
    return rows


def test_no_module_over_500_lines_and_no_class_over_400():
    for f in sorted(PACKAGE.rglob("*.py")):
        text = f.read_text()
        assert text.count("\n") <= 500, f"{f.relative_to(ROOT)} has {text.count(chr(10))} lines"
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef):
                n = node.end_lineno - node.lineno + 1
                assert n <= 400, f"{f.relative_to(ROOT)}: class {node.name} has {n} lines"


def test_imports_run_one_way_as_the_readme_draws_them():
    layers = readme_layers()
    order = {m: i for i, (names, _) in enumerate(layers) for m in names}
    mods = modules()
    assert set(mods) <= set(order), f"modules missing from the README's import table: {set(mods) - set(order)}"
    for name, path in mods.items():
        imported = runtime_imports(path)
        allowed = layers[order[name]][1] & set(order)
        below = {m for m, i in order.items() if i > order[name]}
        assert imported <= below, f"{name} imports {imported - below}, which are not below it in the README"
        assert imported <= allowed, f"{name} imports {imported - allowed} beyond what the README lists"
