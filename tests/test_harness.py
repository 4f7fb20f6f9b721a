"""tests/forkserver.py, the harness that runs scripts as forks of one server: a forked run is what a new interpreter
would be where a test can see it (its random numbers, the folders it reads from its environment at start)."""

import os
import sys

import pytest
from conftest import run

# whether the run is a fork (the server has imported torch before the code starts), then one draw of each generator
DRAW = """import sys
forked = "torch" in sys.modules
import random, numpy, torch
print(forked, random.random(), numpy.random.rand(), torch.rand(1).item())
"""


def python(code, env=None):
    return run("-c", cmd=[sys.executable, "-c", code], env=env).stdout.split()


@pytest.fixture(scope="module")
def served():
    """The suite's own environment has a fork server (one is started at the second run in an environment)."""
    for _ in range(3):
        if python("import sys; print('torch' in sys.modules)") == ["True"]:
            return
    raise AssertionError("the third run in the same environment is still not a fork")


def test_forked_runs_draw_different_random_numbers(served):
    """Unseeded randomness differs between two forked runs, as between two new interpreters (numpy's global
    generator and torch's default one were the server's for every fork), so a test that runs a script twice to see
    that it is deterministic can see a generator the script forgot to seed."""
    first, second = python(DRAW), python(DRAW)
    assert first[0] == second[0] == "True"
    for generator in (1, 2, 3):  # random, numpy, torch
        assert first[generator] != second[generator], (first, second)


@pytest.mark.parametrize(
    "name, value, code, expected",
    [  # each read when the interpreter starts, or (TMPDIR) by torch's import in the server
        ("HOME", "{tmp}", "import site; print(site.getusersitepackages())", "{tmp}/.local"),
        ("TMPDIR", "{tmp}", "import tempfile; print(tempfile.gettempdir())", "{tmp}"),
        ("LC_ALL", "POSIX", "import locale; print(locale.setlocale(locale.LC_CTYPE))", "C"),  # the server's: C.UTF-8
    ],
)
def test_another_home_tmpdir_or_locale_starts_its_own_interpreter(served, tmp_path, name, value, code, expected):
    """A run whose HOME, TMPDIR or locale differs from the server's sees its own (a fork would see the server's)."""
    value, expected = (text.format(tmp=tmp_path) for text in (value, expected))
    (out,) = python(code, env={**os.environ, name: value})
    assert out == expected or out.startswith(expected + "/"), (name, out)
