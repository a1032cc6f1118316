#!/usr/bin/env python3
"""Checks that fastmaml's imports point one way: no import cycle between its modules, and every import goes
from a layer to the same layer or one below it:

    api       fastmaml (package), api, plan, calls, graphs, func, explain, cli, __main__, distributed, train,
              bench
    engine    fastmaml.engine              (meta-steps: the sweeps, the MLP engine, task chunks)
    programs  fastmaml.programs            (how a model computes loss, gradient, HVP for all tasks)
    ops       fastmaml.ops                 (named ops: references and backends)
    kernels   fastmaml.kernels, fastmaml.build
    base      errors, schedule, layout, losses, tasks, inner_lr, batchnorm, result, msl, models, data,
              precision (used by every layer; imports only other base modules)

Every import counts, at module level or inside a function. `python scripts/check_imports.py` prints the
violations and exits 1 if there are any.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path
from typing import Dict, List, Set, Tuple

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "fastmaml"
LAYERS = ["api", "engine", "programs", "ops", "kernels", "base"]  # top to bottom
_LAYER_OF = {
    "fastmaml": "api",
    "fastmaml.api": "api",
    "fastmaml.plan": "api",
    "fastmaml.calls": "api",
    "fastmaml.graphs": "api",
    "fastmaml.explain": "api",
    "fastmaml.cli": "api",
    "fastmaml.__main__": "api",
    "fastmaml.func": "api",
    "fastmaml.distributed": "api",
    "fastmaml.train": "api",
    "fastmaml.bench": "api",
    "fastmaml.engine": "engine",
    "fastmaml.programs": "programs",
    "fastmaml.ops": "ops",
    "fastmaml.kernels": "kernels",
    "fastmaml.build": "kernels",
}
BASE = (
    "errors",
    "schedule",
    "layout",
    "losses",
    "tasks",
    "inner_lr",
    "batchnorm",
    "result",
    "msl",
    "models",
    "data",
    "context",
    "blackbox",
    "precision",
)
_LAYER_OF.update({f"fastmaml.{m}": "base" for m in BASE})


def layer(module: str) -> str:
    """The layer of a fastmaml module (its longest listed prefix)."""
    parts = module.split(".")
    for i in range(len(parts), 0, -1):
        name = ".".join(parts[:i])
        if name in _LAYER_OF:
            return _LAYER_OF[name]
    raise KeyError(f"{module}: not assigned to a layer in scripts/check_imports.py")


def modules() -> Dict[str, Path]:
    """{dotted name: file} of every module of the package."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports(name: str, path: Path, known: Set[str]) -> List[Tuple[str, int]]:
    """The fastmaml modules `name` imports (resolved to modules when the name is one), with line numbers."""
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "fastmaml"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "fastmaml":
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.append((sub if sub in known else target, node.lineno))
    return found


def check() -> List[str]:
    mods = modules()
    known = set(mods)
    edges: Dict[str, Set[str]] = {m: set() for m in mods}
    problems = []
    for name, path in sorted(mods.items()):
        for target, line in imports(name, path, known):
            while target not in known and "." in target:
                target = target.rsplit(".", 1)[0]
            if target == name or target not in known:
                continue
            edges[name].add(target)
            src, dst = layer(name), layer(target)
            if LAYERS.index(dst) < LAYERS.index(src):
                problems.append(
                    f"{path.relative_to(ROOT)}:{line}: {name} ({src}) imports {target} ({dst}), a higher layer"
                )
    problems += [f"import cycle: {' -> '.join(c)}" for c in _cycles(edges)]
    return problems


def _cycles(edges: Dict[str, Set[str]]) -> List[List[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp) + [sorted(comp)[0]])

    sys.setrecursionlimit(10000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def main() -> int:
    problems = check()
    for p in problems:
        print(p)
    print(f"{len(problems)} import problem(s) in fastmaml/" if problems else "imports: no cycles, layers point one way")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
