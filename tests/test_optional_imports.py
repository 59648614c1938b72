"""Optional peers (torch-optimizer, apex, deepspeed, DALI, timm, bitsandbytes, torchao, optimi) are never
imported at module level.

The GPU machine's image has timm but not torch-optimizer, apex, deepspeed, DALI, bitsandbytes, torchao or
optimi; one module-level import of a missing peer in a collected file makes `pytest -m cuda` fail at
collection and run no GPU test at all. So every test module, and every module of the packages the tests
import, imports a peer only inside the function that needs it (tests: `pytest.importorskip`). Module
level here means code run at import: the module body and class bodies, `if`/`try` blocks included,
function bodies excluded (`if TYPE_CHECKING:` blocks excepted). .ci/min_stack_check.sh proves the same by
collecting the `cuda` suite on a stack without torch-optimizer.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OPTIONAL_PEERS = ("torch_optimizer", "apex", "deepspeed", "nvidia.dali", "timm", "bitsandbytes", "torchao", "optimi")
SCANNED = ("tests", "fastlars", "benchmarks", "train")


def _is_peer(module: str) -> bool:
    return any(module == peer or module.startswith(peer + ".") for peer in OPTIONAL_PEERS)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_time_nodes(body: list[ast.stmt]) -> Iterator[ast.AST]:
    """Every node run when the module is imported: descend into everything but function bodies."""
    for stmt in body:
        if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            yield from stmt.decorator_list
            continue
        if isinstance(stmt, ast.If) and _is_type_checking(stmt):
            yield from _import_time_nodes(stmt.orelse)
            continue
        yield stmt
        for child in ast.iter_child_nodes(stmt):
            if isinstance(child, ast.stmt):
                yield from _import_time_nodes([child])
            elif not isinstance(child, ast.Lambda):
                yield from ast.walk(child)


def module_level_peer_imports(source: str) -> list[tuple[int, str]]:
    """(line, module) of each optional peer imported when `source` is imported as a module:
    `import x`, `from x import y`, and `importlib.import_module("x")` / `__import__("x")` with a literal."""
    found = []
    for node in _import_time_nodes(ast.parse(source).body):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if called in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                names = [node.args[0].value]
        found += [(node.lineno, name) for name in names if _is_peer(name)][:1]
    return found


def _python_files() -> list[Path]:
    return sorted(p for folder in SCANNED for p in (ROOT / folder).rglob("*.py"))


def test_no_module_imports_an_optional_peer_at_import_time() -> None:
    files = _python_files()
    assert len([f for f in files if f.parent.name == "tests"]) >= 20  # the scan really sees the test suite
    offenders = [f"{path.relative_to(ROOT)}:{line} imports {name}"
                 for path in files for line, name in module_level_peer_imports(path.read_text())]
    assert not offenders, "optional peers imported at module level (import them inside the test):\n" + "\n".join(
        offenders)


@pytest.mark.parametrize(("source", "expected"), [
    ("import torch_optimizer\n", [(1, "torch_optimizer")]),
    ("import torch\nimport timm.optim\n", [(2, "timm.optim")]),
    ("from nvidia.dali import fn\n", [(1, "nvidia.dali")]),
    ("from nvidia import dali\n", [(1, "nvidia.dali")]),
    ("try:\n    import apex\nexcept ImportError:\n    apex = None\n", [(2, "apex")]),
    ("class A:\n    import deepspeed\n", [(2, "deepspeed")]),
    ("import importlib\nX = importlib.import_module('timm')\n", [(2, "timm")]),
    ("def f():\n    import torch_optimizer\n", []),
    ("async def f():\n    from apex.optimizers import FusedLAMB\n", []),
    ("f = lambda: __import__('timm')\n", []),
    ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import timm\n", []),
    ("import nvidia.cuda_runtime\nimport timmy\n", []),
])
def test_the_scan_finds_import_time_peers(source: str, expected: list[tuple[int, str]]) -> None:
    assert module_level_peer_imports(source) == expected
