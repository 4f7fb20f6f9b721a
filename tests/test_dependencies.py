"""Every third-party package that a script or a test imports is declared in pyproject.toml.

A package that arrives only as another's dependency (pandas through datasets, say) is luck, not a declaration:
the day that package drops it, a fresh install breaks where CI, run where it was installed by hand, stays green.
"""

import ast
import re
import subprocess
import sys
from importlib.metadata import packages_distributions

import pytest
from conftest import REPO

tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")


def normalise(name):
    """A distribution's name as PEP 503 compares them: case and runs of -_. do not matter."""
    return re.sub(r"[-_.]+", "-", name).lower()


def declared_distributions(pyproject):
    """Every distribution pyproject.toml names, in its dependencies or in any extra."""
    project = tomllib.loads(pyproject)["project"]
    requirements = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    return {normalise(re.match(r"[A-Za-z0-9_.\-]+", r).group(0)) for r in requirements}


def imported_modules(source):
    """(top-level module, how) for each absolute import in source. how: "guarded" inside a try whose handler catches
    ImportError (code that works without it), "skip" asked through pytest.importorskip (a test that skips with its
    reason), else None."""
    tree = ast.parse(source)
    guarded = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(
            h.type is None or "ImportError" in ast.unparse(h.type) or "Exception" in ast.unparse(h.type)
            for h in node.handlers
        ):
            guarded |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    for node in ast.walk(tree):
        how = "guarded" if id(node) in guarded else None
        if isinstance(node, ast.Import):
            yield from ((a.name.split(".")[0], how) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module.split(".")[0], how
        elif (
            isinstance(node, ast.Call)
            and ast.unparse(node.func).endswith("importorskip")
            and node.args
            and isinstance(node.args[0], ast.Constant)
        ):
            yield node.args[0].value.split(".")[0], "skip"


def undeclared_imports(files, local, declared, owners):
    """'file: module (why)' for each import of a third-party package that pyproject.toml does not declare: a
    guarded import (runtime.py's psutil, used where it is installed) never; a test's importorskip where the package
    is installed (the test runs here and skips for a newcomer). owners: module -> distributions that provide it
    (importlib.metadata.packages_distributions)."""
    problems = []
    for path, source in files:
        for module, how in imported_modules(source):
            if module in sys.stdlib_module_names or module in local or module == "__future__" or how == "guarded":
                continue
            dists = {normalise(d) for d in owners.get(module, [])}
            if dists and not dists & declared:
                problems.append(f"{path}: {module} (installed as {', '.join(sorted(dists))}, not declared)")
            elif not dists and how is None and normalise(module) not in declared:
                problems.append(f"{path}: {module} (not installed and not declared)")
    return problems


def tracked_python_files():
    out = subprocess.run(["git", "ls-files", "*.py"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    return [(name, (REPO / name).read_text(encoding="utf-8")) for name in out.split()]


def test_every_third_party_import_is_declared():
    files = tracked_python_files()
    if not files:
        pytest.skip("not a git checkout: no tracked files to read")
    local = {name.rsplit("/", 1)[-1].removesuffix(".py") for name, _ in files} | {"lm_eval_tasks"}
    declared = declared_distributions((REPO / "pyproject.toml").read_text())
    problems = undeclared_imports(files, local, declared, packages_distributions())
    assert not problems, "declare these in pyproject.toml (a test dependency in the `test` extra):\n" + "\n".join(
        problems
    )


def test_the_check_bites():
    """The check flags an undeclared package that is installed, one that is missing, and a test that skips here
    without an undeclared package it finds installed; it passes guarded imports, installed or not."""
    declared = {"numpy", "torch"}
    owners = {"numpy": ["numpy"], "torch": ["torch"], "pandas": ["pandas"], "yaml": ["PyYAML"]}
    owners |= {"psutil": ["psutil"], "gguf": ["gguf"]}
    source = (
        "import numpy as np\nfrom torch import nn\nimport model\nimport pandas\n"
        "def f():\n    import yaml.parser\n"
        "try:\n    import fancy\nexcept ImportError:\n    fancy = None\n"
        "try:\n    import psutil\nexcept ImportError:\n    psutil = None\n"
        "mlx = pytest.importorskip('mlx.core')\ngguf = pytest.importorskip('gguf')\nimport nothere\n"
    )
    problems = undeclared_imports([("t.py", source)], {"model"}, declared, owners)
    assert sorted(problems) == [
        "t.py: gguf (installed as gguf, not declared)",
        "t.py: nothere (not installed and not declared)",
        "t.py: pandas (installed as pandas, not declared)",
        "t.py: yaml (installed as pyyaml, not declared)",
    ]
    assert declared_distributions(
        "[project]\ndependencies = [\"Foo_Bar>=1; python_version>'3'\"]\n"
        '[project.optional-dependencies]\nx = ["baz[cpu]"]\n'
    ) == {"foo-bar", "baz"}
