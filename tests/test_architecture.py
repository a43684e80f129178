"""The package architecture holds and dvc.yaml's code deps cannot go stale (issue 12).

Imports are read with ``ast`` (no stage runs): every ``import`` / ``from ... import`` anywhere in
a module, including those inside functions, is followed transitively through hsae_core and
stages. Each pipeline stage must list, as deps, a file or folder covering every module its
script reaches, and nothing under hsae_core/ or stages/ that it does not reach.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CORE = REPO / "hsae_core"

#: Which hsae_core packages each package may import (the table in hsae_core/__init__.py).
ALLOWED = {
    "common": set(),
    "model": {"common"},
    "data": {"common"},
    "evaluation": {"model", "data", "common"},
    "judge": {"evaluation", "model", "data", "common"},
    "interop": {"model", "common"},
    "site": {"evaluation", "model", "common"},
    "pipeline": {"common", "model", "data", "evaluation", "judge", "interop", "site"},
}


def module_file(name: str) -> Path | None:
    """The file of a dotted module name under the repository, or None (third-party)."""
    base = REPO.joinpath(*name.split("."))
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def with_parents(name: str) -> list[str]:
    """Importing ``a.b.c`` runs ``a/__init__``, ``a/b/__init__`` and ``a.b.c``."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


@cache
def direct_imports(path: Path) -> frozenset[Path]:
    """Repository files imported anywhere in ``path`` (package __init__ files included)."""
    tree = ast.parse(path.read_text())
    names: list[str] = []
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .x import y
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names.append(base)
            names += [f"{base}.{a.name}" for a in node.names]  # submodules imported by name
    found = set()
    for name in names:
        for part in with_parents(name):
            f = module_file(part)
            if f is not None:
                found.add(f)
    return frozenset(found - {path})


def reached(path: Path) -> set[Path]:
    seen, todo = set(), [path]
    while todo:
        f = todo.pop()
        if f not in seen:
            seen.add(f)
            todo += direct_imports(f)
    return seen


def stages() -> dict[str, dict]:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def stage_script(stage: dict) -> Path:
    words = stage["cmd"].split()
    return module_file(words[words.index("-m") + 1])


def dep_paths(stage: dict) -> list[Path]:
    return [REPO / (d if isinstance(d, str) else next(iter(d))) for d in stage.get("deps", [])]


def code_only(files: set[Path]) -> set[Path]:
    """Files that can change a result: empty or docstring-only __init__ files of the top
    packages (checked below to stay so) cannot."""
    return {f for f in files if f not in INERT}


INERT = {CORE / "__init__.py", REPO / "stages" / "__init__.py"}


def package_of(path: Path) -> str | None:
    rel = path.relative_to(REPO).parts
    return rel[1] if rel[0] == "hsae_core" and len(rel) > 2 else None


def test_top_level_init_files_hold_no_code():
    for f in INERT:
        body = ast.parse(f.read_text()).body
        assert all(isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) for n in body), f


def test_every_module_belongs_to_a_package():
    loose = [f.name for f in CORE.glob("*.py") if f.name != "__init__.py"]
    assert not loose, f"modules outside a package: {loose}"
    assert {p.name for p in CORE.iterdir() if (p / "__init__.py").is_file()} == set(ALLOWED)


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_packages_import_only_what_they_may(package):
    for f in sorted((CORE / package).rglob("*.py")):
        used = {package_of(g) for g in direct_imports(f)} - {None, package}
        assert used <= ALLOWED[package], (f"{f.relative_to(REPO)} imports "
                                          f"{sorted(used - ALLOWED[package])}")


def test_model_package_has_no_file_io_zarr_or_transformers():
    banned = ("zarr", "transformers", "safetensors", "fsspec", "yaml", "open(", "Path(", "fsio")
    for f in (CORE / "model").rglob("*.py"):
        code = f.read_text()
        tree = ast.parse(code)
        imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
                    for a in n.names}
        imported |= {(n.module or "").split(".")[0] for n in ast.walk(tree)
                     if isinstance(n, ast.ImportFrom)}
        assert not imported & {"zarr", "transformers", "safetensors", "fsspec", "yaml",
                               "pathlib"}, f
        calls = {n.func.id for n in ast.walk(tree)
                 if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
        assert "open" not in calls, f"{f.name} opens files"
        assert banned  # the list documents what "no file I/O" means here


def test_stage_deps_cover_every_reached_module_and_nothing_more(capsys):
    rows = []
    for name, stage in stages().items():
        script = stage_script(stage)
        code = code_only(reached(script))
        deps = dep_paths(stage)
        uncovered = sorted(str(f.relative_to(REPO)) for f in code
                           if not any(f == d or d in f.parents for d in deps))
        assert not uncovered, f"stage {name} reaches modules its deps miss: {uncovered}"
        for d in deps:
            rel = d.relative_to(REPO)
            if rel.parts[0] in ("hsae_core", "stages"):
                assert any(f == d or d in f.parents for f in code), \
                    f"stage {name} lists {rel} but never imports it: remove the dep"
        packages = sorted({package_of(f) for f in code} - {None})
        rows.append(f"{name:22s} {', '.join(packages)}")
    with capsys.disabled():
        print("\nstage                  hsae_core packages reached (all covered by its deps)")
        print("\n".join(rows))


def test_python_lines_fit_in_99_columns():
    """The project's style: no line of the library, stages, tests or benchmarks over 99."""
    long = [f"{path.relative_to(REPO)}:{n}" for folder in ("hsae_core", "stages", "tests",
                                                           "benchmarks")
            for path in sorted((REPO / folder).rglob("*.py"))
            for n, line in enumerate(path.read_text().splitlines(), 1) if len(line) > 99]
    assert not long, f"lines over 99 characters: {long}"
