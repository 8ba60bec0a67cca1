"""The layer rules of DESIGN.md, checked on the import statements of every module."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
OUR_PACKAGES = ("kernels", "engine", "runtime", "trainer", "protos", "benchmarks", "tests", "vla_mbpo")
# The only engine modules the trainer may use: torch-only model definitions shared by training and serving.
TRAINER_ENGINE_ALLOWED = ("engine.layout", "engine.image_tokenizer")


@dataclass(frozen=True)
class Violation:
    path: str
    line: int
    module: str
    rule: str


def forbidden_reason(package: str, imported: str) -> str | None:
    """Why `package` may not import `imported` (a dotted module name), or None if allowed."""
    top = imported.split(".")[0]
    if top in ("benchmarks", "tests") and package != top:
        return "nothing imports benchmarks or tests"
    if package in ("kernels", "protos") and top in OUR_PACKAGES and top != package:
        return f"{package} imports nothing of ours"
    if package == "engine" and (top in ("grpc", "runtime", "trainer", "protos", "vla_mbpo")):
        return "engine never imports grpc, protos, runtime or trainer"
    if package == "runtime" and top in ("trainer", "vla_mbpo"):
        return "runtime never imports trainer"
    if package == "trainer":
        if top in ("kernels", "runtime", "vla_mbpo"):
            return "trainer talks to the server only through protos (its rollout client)"
        if top == "engine" and not imported.startswith(TRAINER_ENGINE_ALLOWED):
            return f"trainer may import only {TRAINER_ENGINE_ALLOWED} from engine"
    return None


def imported_modules(tree: ast.AST, module_name: str) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the importing module's package
                base = module_name.split(".")[: -node.level]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target in OUR_PACKAGES:  # `from engine import kv_cache` imports engine.kv_cache
                found += [(node.lineno, f"{target}.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, target))
    return found


def find_violations(root: Path) -> list[Violation]:
    violations = []
    for package in OUR_PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            rel = path.relative_to(root)
            module_name = ".".join(rel.with_suffix("").parts)
            tree = ast.parse(path.read_text(), filename=str(path))
            for line, imported in imported_modules(tree, module_name):
                reason = forbidden_reason(package, imported)
                if reason:
                    violations.append(Violation(str(rel), line, imported, reason))
    return violations


def test_repository_respects_layers():
    violations = find_violations(REPO_ROOT)
    assert violations == [], "\n".join(f"{v.path}:{v.line} imports {v.module}: {v.rule}" for v in violations)


@pytest.mark.parametrize(
    ("package", "source", "rule"),
    [
        ("kernels", "from engine.layout import TokenLayout\n", "kernels imports nothing of ours"),
        ("engine", "import grpc\n", "engine never imports grpc, protos, runtime or trainer"),
        ("engine", "from runtime import servicer\n", "engine never imports grpc, protos, runtime or trainer"),
        ("trainer", "from engine import kv_cache\n",
         "trainer may import only ('engine.layout', 'engine.image_tokenizer') from engine"),
        ("trainer", "import kernels.paged_attention\n",
         "trainer talks to the server only through protos (its rollout client)"),
        ("runtime", "from ..trainer import ppo\n", "runtime never imports trainer"),
        ("runtime", "import benchmarks.engine\n", "nothing imports benchmarks or tests"),
    ],
)
def test_forbidden_import_is_caught(tmp_path, package, source, rule):
    for name in OUR_PACKAGES:
        (tmp_path / name).mkdir()
    (tmp_path / package / "bad.py").write_text("import torch\n" + source)
    violations = find_violations(tmp_path)
    assert [(v.path, v.line, v.rule) for v in violations] == [(f"{package}/bad.py", 2, rule)]


def test_allowed_imports_pass(tmp_path):
    for name in OUR_PACKAGES:
        (tmp_path / name).mkdir()
    (tmp_path / "trainer" / "ok.py").write_text(
        "from engine.layout import TokenLayout\nfrom engine import image_tokenizer\n"
        "from protos.vla_mbpo.v1 import world_model_pb2\n")
    (tmp_path / "runtime" / "ok.py").write_text("import grpc\nfrom engine import engine\n")
    (tmp_path / "kernels" / "ok.py").write_text("import torch\nimport triton\nfrom . import reference\n")
    assert find_violations(tmp_path) == []
