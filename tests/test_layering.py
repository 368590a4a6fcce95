"""Imports point down only (docs/architecture.md): model imports nothing from lmstack, train and infer never
import each other, only cli composes layers."""

import ast
from pathlib import Path

import lmstack

LAYERS = {"model", "data", "kernels", "compress", "train", "finetune", "infer", "serve", "diagnose"}
ALLOWED = {
    "model": set(),
    "data": {"model"},
    "kernels": {"model"},
    "compress": {"model", "kernels"},
    "train": {"model", "data", "kernels"},
    "finetune": {"model", "kernels", "compress"},
    "infer": {"model", "kernels", "compress"},
    "serve": {"infer", "model"},
    "diagnose": {"model", "data", "train"},
    "cli": LAYERS,
}


def lmstack_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        found |= {n.split(".")[1] for n in names if n.startswith("lmstack.") and n.count(".") >= 1}
    return found


def test_imports_point_down_only():
    root = Path(lmstack.__file__).parent
    bad = []
    for package, allowed in ALLOWED.items():
        for path in sorted((root / package).rglob("*.py")):
            for target in lmstack_imports(path) - allowed - {package}:
                bad.append(f"{path.relative_to(root)} imports lmstack.{target}")
    assert not bad, "layering violations:\n" + "\n".join(bad)


def test_every_package_is_known():
    root = Path(lmstack.__file__).parent
    packages = {p.name for p in root.iterdir() if (p / "__init__.py").exists()}
    assert packages <= set(ALLOWED), f"add {packages - set(ALLOWED)} to ALLOWED and docs/architecture.md"
