"""The import rules of the README's code map, checked on every module's imports (function-level ones included)."""

from __future__ import annotations

import ast
import re
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMMANDS = {"dsr.train", "dsr.sample", "dsr.evaluate", "dsr.analyze", "dsr.stats", "dsr.cache_latents", "dsr.convert",
            "dsr.data.make_shards", "dsr.tune"}  # fmt: skip


def code_map(readme: Path = REPO / "README.md") -> dict[str, set[str]]:
    """{package: the packages it may import}, from the README's code-map table."""
    section = readme.read_text().split("### Code map", 1)[1]
    rules = {}
    for package, allowed in re.findall(r"^\| `dsr\.(\w+)` \|[^|]*\| ([^|]*) \|$", section, flags=re.M):
        rules[package] = {a.strip() for a in allowed.split(",")} - {"-", ""}
    return rules


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_of(module: str) -> str:
    """`commands` for a command, `root` for `dsr` itself, else the package under `dsr` (`config` for dsr.config)."""
    if module in COMMANDS:
        return "commands"
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "root"


def imports(path: Path, module: str) -> set[str]:
    """Every `dsr` module `path` imports, anywhere in the file (relative imports resolved)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "dsr"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")[: len(module.split(".")) - node.level + (path.name == "__init__.py")]
                base = ".".join([*anchor, base] if base else anchor)
            if base.split(".")[0] == "dsr":
                found.add(base)
                found |= {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in COMMANDS}
    return found


def violations(root: Path = REPO / "dsr", rules: dict[str, set[str]] | None = None) -> list[str]:
    """Every import that breaks the code map, every import of a command, and every package cycle."""
    rules = code_map() if rules is None else rules
    problems, graph = [], {}
    for path in sorted(root.rglob("*.py")):
        module = module_name(path, root)
        source = package_of(module)
        for target in sorted(imports(path, module)):
            if target in COMMANDS and target != module:
                problems.append(f"{module} imports the command {target}")
                continue
            dest = package_of(target)
            if dest in (source, "root", "commands") or source in ("commands", "root"):
                continue
            graph.setdefault(source, set()).add(dest)
            if dest not in rules.get(source, set()):
                problems.append(f"{module} ({source}) imports {target} ({dest}): not in its row of the code map")

    def cycle_from(node: str, stack: list[str]) -> list[str] | None:
        if node in stack:
            return [*stack[stack.index(node) :], node]
        for nxt in sorted(graph.get(node, ())):
            found = cycle_from(nxt, [*stack, node])
            if found:
                return found
        return None

    for package in sorted(graph):
        cycle = cycle_from(package, [])
        if cycle:
            problems.append("package cycle: " + " -> ".join(cycle))
            break
    return problems


def test_the_code_map_covers_every_package_and_is_acyclic():
    rules = code_map()
    packages = {p.name for p in (REPO / "dsr").iterdir() if p.is_dir() and (p / "__init__.py").exists()} | {"config"}
    assert set(rules) == packages
    assert all(allowed <= set(rules) for allowed in rules.values())
    order: list[str] = []
    while len(order) < len(rules):  # a topological order exists only without cycles
        ready = sorted(p for p in rules if p not in order and rules[p] <= set(order))
        assert ready, f"the code map has a cycle among {sorted(set(rules) - set(order))}"
        order += ready


def test_every_import_follows_the_code_map():
    assert violations() == []


def test_an_upward_import_a_command_import_and_a_cycle_are_caught(tmp_path):
    root = tmp_path / "dsr"
    shutil.copytree(REPO / "dsr", root, ignore=shutil.ignore_patterns("__pycache__"))
    with (root / "models" / "layers.py").open("a") as f:
        f.write("\n\ndef _late():\n    from dsr.lightning.dit_module import DiTModule  # noqa\n")
    with (root / "lightning" / "callbacks.py").open("a") as f:
        f.write("\nfrom dsr.sample import run  # noqa\n")
    found = violations(root)
    assert any("dsr.models.layers (models) imports dsr.lightning.dit_module (lightning)" in p for p in found)
    assert any("imports the command dsr.sample" in p for p in found)
    assert any(p.startswith("package cycle:") and "models" in p and "lightning" in p for p in found)
