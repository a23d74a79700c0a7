"""The layering of docs/architecture.md, read from the imports of every file (static: nothing runs).

modules/ and config.py import only config and modules (they drop into the CS224N starter); models/
adds only models; common/ imports nothing of the project; tasks/ and evaluation/ never import
training/; no library module, benchmark or test helper imports a top-level script; the trainer
never reads an argparse namespace."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {p.stem for p in ROOT.glob("*.py")}
PACKAGES = {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}


def project_imports(path: Path) -> set[str]:
    """Top-level project names (packages, scripts, config) imported anywhere in `path`."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names & (SCRIPTS | PACKAGES)


def files_of(*packages: str) -> list[Path]:
    return [p for pkg in packages for p in sorted((ROOT / pkg).rglob("*.py"))]


def violations(paths, allowed: set[str]) -> dict[str, set[str]]:
    out = {}
    for path in paths:
        bad = project_imports(path) - allowed
        if bad:
            out[str(path.relative_to(ROOT))] = bad
    return out


def test_modules_and_config_import_only_themselves():
    assert violations([ROOT / "config.py", *files_of("modules")], {"config", "modules"}) == {}


def test_models_import_only_config_modules_and_models():
    assert violations(files_of("models"), {"config", "modules", "models"}) == {}


def test_common_imports_nothing_of_the_project():
    assert violations(files_of("common"), {"common"}) == {}


def test_tasks_and_evaluation_do_not_import_training():
    allowed = {"common", "config", "models", "modules", "tasks", "evaluation"}
    assert violations(files_of("tasks", "evaluation"), allowed) == {}


def test_no_library_or_benchmark_imports_a_script():
    libraries = [p for pkg in sorted(PACKAGES - {"tests"}) for p in files_of(pkg)]
    libraries += [p for p in files_of("tests") if not p.name.startswith("test_")]  # helpers and workers
    found = {str(p.relative_to(ROOT)): project_imports(p) & (SCRIPTS - {"config", "optimizer"})
             for p in libraries}
    assert {k: v for k, v in found.items() if v} == {}


def test_the_trainer_reads_no_argparse_namespace():
    for path in (ROOT / "training" / "trainer.py", ROOT / "training" / "task.py"):
        source = path.read_text(encoding="utf-8")
        assert "argparse" not in source and "args." not in source, path
