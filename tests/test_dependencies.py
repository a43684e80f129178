"""pyproject.toml's runtime dependencies are what hsae_core/ and stages/ import (issue 22): no
declared package goes unused, no imported third-party module goes undeclared.

Imports are read with ``ast`` (every ``import`` and ``from ... import`` anywhere in a module,
inside functions too; nothing is imported). A distribution is matched to the top-level module
it installs (:data:`IMPORT_NAMES` where the two names differ); :data:`RUNTIME_ONLY` lists the
packages needed at run time without an import, each with the reason; :data:`OPTIONAL_IMPORTS`
the modules imported behind a guard that works without them.
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CODE = ("hsae_core", "stages")

#: Distribution name -> the top-level module it installs, where they differ.
IMPORT_NAMES = {
    "pyyaml": "yaml",
    "ruamel-yaml": "ruamel",
    "umap-learn": "umap",
}
#: Declared for run time, never imported by our code.
RUNTIME_ONLY = {
    # transformers reads the embedded SmolLM2 GGUF file with gguf (imported inside transformers)
    "gguf": "transformers' GGUF loader",
    # transformers needs accelerate to load a GGUF checkpoint (commit 3b867f5: the real SmolLM2
    # GGUF test failed without it)
    "accelerate": "transformers' GGUF loading",
    # the pipeline is driven by the dvc command (dvc.yaml, `make repro`, `dvc exp run` from the
    # studies' subprocesses); the stages never import it
    "dvc": "the dvc command line (dvc repro, dvc exp)",
    # DataFrame.to_markdown imports tabulate (the studies' Markdown tables)
    "tabulate": "pandas' DataFrame.to_markdown",
}
#: Imported behind a guard that runs without them: not dependencies.
OPTIONAL_IMPORTS = {
    # SAEBench needs internet and a GPU; hsae_core/interop/saebench.py works as a plain module
    # honouring SAEBench's contract when it is missing (``HAVE_SAEBENCH``)
    "sae_bench",
}


def declared() -> dict[str, str]:
    """Runtime dependencies of pyproject.toml: normalised distribution name -> requirement."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    out = {}
    for req in project["dependencies"]:
        name = re.match(r"[A-Za-z0-9._-]+", req).group(0)
        out[re.sub(r"[-_.]+", "-", name).lower()] = req  # PEP 503 names
    return out


def module_of(dist: str) -> str:
    return IMPORT_NAMES.get(dist, dist.replace("-", "_"))


def imported() -> dict[str, set[str]]:
    """Top-level third-party modules imported anywhere in hsae_core/ and stages/ -> the files
    importing them (the standard library, our own packages and relative imports left out)."""
    ours = set(CODE)
    out: dict[str, set[str]] = {}
    for folder in CODE:
        for path in sorted((REPO / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in ours:
                        out.setdefault(top, set()).add(str(path.relative_to(REPO)))
    return out


def test_every_declared_dependency_is_imported_or_needed_at_run_time():
    used = set(imported())
    unused = sorted(d for d in declared() if module_of(d) not in used and d not in RUNTIME_ONLY)
    assert not unused, (f"pyproject.toml declares {unused}, which nothing in hsae_core/ or "
                        "stages/ imports: drop them, or say in RUNTIME_ONLY why they are needed")


def test_every_imported_third_party_module_is_declared():
    provided = {module_of(d) for d in declared()}
    undeclared = {m: sorted(files) for m, files in imported().items()
                  if m not in provided and m not in OPTIONAL_IMPORTS}
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"


def test_the_allow_lists_stay_honest():
    """Every allow-listed package is declared and really never imported (else it belongs with
    the imports); every optional import is imported, behind a guard, and not declared."""
    dists, used = declared(), imported()
    for dist in RUNTIME_ONLY:
        assert dist in dists, f"RUNTIME_ONLY names {dist}, which pyproject.toml does not declare"
        assert module_of(dist) not in used, f"{dist} is imported: remove it from RUNTIME_ONLY"
    for dist in IMPORT_NAMES:
        assert dist in dists, f"IMPORT_NAMES maps {dist}, which pyproject.toml does not declare"
    for module in OPTIONAL_IMPORTS:
        assert module in used and module not in {module_of(d) for d in dists}, module
        for rel in used[module]:
            tree = ast.parse((REPO / rel).read_text())
            guarded = [n for n in ast.walk(tree) if isinstance(n, ast.Try)
                       and any(isinstance(h.type, ast.Name) and h.type.id == "ImportError"
                               for h in n.handlers)
                       and any(isinstance(b, (ast.Import, ast.ImportFrom))
                               and module in ast.unparse(b) for b in n.body)]
            assert guarded, f"{rel} imports {module} without an ImportError guard"


def test_pydantic_is_neither_declared_nor_imported():
    """The parameter checks use our own coercion (hsae_core/pipeline/params.py)."""
    assert "pydantic" not in declared() and "pydantic" not in imported()
