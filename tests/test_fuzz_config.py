"""Bad input, systematically (issue 27): every stage script, given random values for random keys (wrong types, zero,
negatives, huge numbers, NaN, empty strings, paths that do not exist, devices that are not here, unknown keys, bare
flags) on the command line or in a config file, exits 0 or exits 2 with exactly one `error:` line: never a
traceback, never a file written. The cases run in this process up to where work would start (runtime.configure's
return: every check is made there, accepts.py's declarations and the scripts' rules), so 200 of them per script take
seconds; a sample runs as real subprocesses. Seeded (hypothesis, derandomized): the same cases every run.
"""

import builtins
import contextlib
import io
import os
import random
import subprocess
import sys

import pytest
from conftest import REPO
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import runtime
from accepts import Accepts

SCRIPTS = {  # script: the config file a user starts from (None: none)
    "train.py": "config/tiny_cpu.py",
    "train_mlx.py": "config/tiny_cpu.py",
    "sft.py": "config/sft_tiny_cpu.py",
    "dpo.py": "config/dpo_tiny_cpu.py",
    "eval.py": "config/eval_tiny_cpu.py",
    "sample.py": None,
    "serve.py": None,
    "export.py": None,
    "bench.py": "config/tiny_cpu.py",
    "prepare.py": None,
}
CASES = 200  # per script, in process
TEXTS = [  # command-line values tried for any key, besides random ones
    *("", " ", "0", "-1", "1", "2", "3", "7", "64", "-0.5", "0.5", "1.0", "1e9", "1e999", "-1e999", "nan", "inf"),
    *("99999999999999999999", "9" * 400, "true", "false", "True", "none", "auto", "all", "abc", "x" * 300),
    *("/no/such/path", "no/such.py", "/", ".", "..", "/dev/null", "cuda", "cuda:0", "cuda:7", "cuda:x", "mps", "gpu"),
    *("cpu", "float16", "bfloat16", "q8_0", "gguf", "hf", "resume", "scratch", "1,2", ",", "64:0.5,128:0.5", "64:nan"),
    *("0:1", "a:b", "off,on", "bpb,nope", "FILE:/no/such", "gpt2", "\x00", "ü", "--x=1"),
]
VALUES = [None, [], [1], {}, (), True, False, 0, -1, 2**64, 10**400, 0.0, -0.0, 1e308, float("nan"), float("inf"), ""]


class ReachedWork(Exception):
    """runtime.configure returned: the script would start its work now."""


CODE = {}


def run_in_process(script, argv, cwd, stop=True):
    """(exit status, stdout, stderr) of `python script argv` run in this process until runtime.configure returns
    (status 0 then; to the end with stop=False). An exception that escapes the script ends it as it ends the
    interpreter: through sys.excepthook, the script's own error handler once it has installed one (a SystemExit
    there is the exit status), else the default one, which prints a traceback, and status 1."""
    path = REPO / script
    if script not in CODE:
        CODE[script] = compile(path.read_text(), str(path), "exec")
    configure, hook, argv0, old_cwd = runtime.configure, sys.excepthook, sys.argv, os.getcwd()

    def stopped(namespace, args, **kwargs):
        configure(namespace, args, **kwargs)
        raise ReachedWork

    out, err = io.StringIO(), io.StringIO()
    runtime.configure, sys.argv = stopped if stop else configure, [str(path), *argv]
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            exec(CODE[script], {"__name__": "__main__", "__file__": str(path), "__builtins__": builtins})
        status = 0
    except ReachedWork:
        status = 0
    except SystemExit as e:
        status = e.code
    except Exception as e:
        status = end_uncaught(e, err)
    finally:
        runtime.configure, sys.excepthook, sys.argv = configure, hook, argv0
        os.chdir(old_cwd)
    return status, out.getvalue(), err.getvalue()


def end_uncaught(e, err):
    """The exit status of an interpreter that an exception e ends (Python's PyErr_Print): sys.excepthook prints it
    (to err here), and a SystemExit that the hook raises is the status; else 1."""
    with contextlib.redirect_stderr(err):
        try:
            sys.excepthook(type(e), e, e.__traceback__)
        except SystemExit as ended:
            return ended.code
    return 1


def declared(script, tmp):
    """(namespace after configure, its annotations) of a script run with --help-less defaults up to its work."""
    seen = {}
    configure = runtime.configure

    def keep(namespace, args, **kwargs):
        seen["ns"] = namespace
        raise ReachedWork

    runtime.configure = keep
    try:
        run_in_process(script, [], tmp)
    finally:
        runtime.configure = configure
    ns = seen["ns"]
    return {k: ns[k] for k in runtime.config_keys(ns)}, ns.get("__annotations__", {})


def assert_answered(status, stdout, stderr, what):
    """The property: exit 0, or exit 2 with exactly one line on stderr, and that line `error: ...`."""
    assert "Traceback" not in stdout + stderr, f"{what}\n{stderr[-3000:]}"
    assert status in (0, None, 2), f"{what}: exit status {status!r}\n{stderr}"
    if status == 2:
        lines = stderr.strip().split("\n")  # a "\r" in a value the user typed starts no new line in a log
        assert len(lines) == 1 and lines[0].startswith("error: "), f"{what}: stderr is\n{stderr}"


def snapshot(root):
    return sorted((str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*"))


def base_argv(script, tree):
    """The user's starting command: the script's config file, and existing paths for the keys that take paths
    (what a prepared data folder or a trained run would give), so that random values meet the other checks too."""
    cwd = tree / "cwd"
    defaults, notes = declared(script, cwd)
    argv = [str(REPO / SCRIPTS[script])] if SCRIPTS[script] else []
    candidates = [str(tree / "folder"), str(tree / "folder" / "file.txt"), str(tree / "new")]
    here = os.getcwd()
    os.chdir(cwd)  # a default's relative path is the run's, not this checkout's (whose data/ a Quick start may fill)
    try:
        for k, v in defaults.items():
            a = notes.get(k)
            if isinstance(a, Accepts) and isinstance(v, str) and not a(v) and any(a(c) for c in candidates):
                argv.append(f"--{k}={next(c for c in candidates if a(c))}")
    finally:
        os.chdir(here)
    return argv, defaults, notes


def overrides(defaults, notes, tree):
    """A hypothesis strategy for a list of random arguments: --key=value, key = value in a config file, an unknown
    key, a bare --flag, a config file that is not there."""
    keys = sorted(defaults)
    paths = [str(tree / "folder"), str(tree / "folder" / "file.txt"), str(tree / "new" / "x")]

    def texts(k):
        a, d = notes.get(k), defaults[k]
        literals = [str(x) for x in getattr(a, "literals", ())]
        near = [str(d), str(d * 2), str(-d), str(d / 2), str(d // 2)] if type(d) in (int, float) else []
        return st.one_of(
            st.sampled_from(TEXTS + literals + near + paths),
            st.integers(-(2**70), 2**70).map(str),
            st.floats().map(repr),
            st.text(max_size=6),
        )

    values = st.one_of(
        st.sampled_from(VALUES), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=6), st.sampled_from(TEXTS)
    )
    one = st.one_of(
        st.sampled_from(keys).flatmap(lambda k: texts(k).map(lambda t: ("cli", k, t))),
        st.tuples(st.just("file"), st.sampled_from(keys), values),
        st.tuples(st.just("flag"), st.sampled_from(keys), st.just(None)),
        st.tuples(st.just("unknown"), st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12), st.just(None)),
        st.tuples(st.just("missing"), st.just(""), st.just(None)),
    )
    return st.lists(one, min_size=1, max_size=3)


def to_argv(case, folder):
    """The arguments for a case; "file" entries go to one config file written in folder (outside the working one)."""
    argv, lines = [], []
    for how, k, v in case:
        if how == "cli":
            argv.append(f"--{k}={v}")
        elif how == "file":
            lines.append(f"{k} = float({str(v)!r})" if isinstance(v, float) else f"{k} = {v!r}")
        elif how == "flag":
            argv.append(f"--{k}")
        elif how == "unknown":
            argv.append(f"--{k}x=1")
        else:
            argv.append(str(folder / "no_such_config.py"))
    if lines:
        (folder / "fuzz_config.py").write_text("\n".join(lines) + "\n")
        argv.insert(0, str(folder / "fuzz_config.py"))
    return argv


def fuzz(script, tree):
    base, defaults, notes = base_argv(script, tree)
    files = tree / "files"
    files.mkdir(exist_ok=True)
    before = snapshot(tree / "cwd") + snapshot(tree / "folder")

    @settings(
        max_examples=CASES,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(overrides(defaults, notes, tree))
    def check(case):
        argv = base + to_argv(case, files)
        status, stdout, stderr = run_in_process(script, argv, tree / "cwd")
        assert_answered(status, stdout, stderr, f"python {script} {' '.join(argv)}")
        assert snapshot(tree / "cwd") + snapshot(tree / "folder") == before, f"python {script} {argv} wrote a file"

    check()


@pytest.mark.parametrize("script", SCRIPTS)
def test_random_config_values(script, tree):
    """200 random invocations per script: each answered by a start or one error line, none by a traceback."""
    fuzz(script, tree)


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_key_declares_what_it_accepts(script, tree):
    """Every config global but a bool has an accepts.py annotation (a bool's type is its whole set); a new key
    without one is named here, while the script itself still runs (type-checked only)."""
    defaults, notes = declared(script, tree / "cwd")
    bare = [k for k, v in defaults.items() if not isinstance(v, bool) and not isinstance(notes.get(k), Accepts)]
    assert not bare, f"{script}: config key {bare[0]!r} declares nothing it accepts; annotate it (see accepts.py)"
    for k, a in notes.items():
        if k in defaults and isinstance(a, Accepts):  # each default is a value its own declaration takes
            assert a(defaults[k]) or isinstance(defaults[k], str), f"{script}: {k}={defaults[k]!r} fails {a.what}"


# A script run as a real process, stopped where its work would start (as run_in_process, through the error handler)
STOP = """import runpy, sys
sys.path.insert(0, sys.argv[1])
import runtime
configure = runtime.configure
def stop(*args, **kwargs):
    configure(*args, **kwargs)
    sys.exit(0)
runtime.configure = stop
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_process(script, argv, cwd, stop=True):
    cmd = [sys.executable, "-c", STOP, str(REPO)] if stop else [sys.executable]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")  # as on a machine with no NVIDIA GPU
    proc = subprocess.run(
        [*cmd, str(REPO / script), *argv], cwd=cwd, capture_output=True, text=True, timeout=120, env=env
    )
    return proc.returncode, proc.stdout, proc.stderr


def test_a_sample_as_real_processes(tree):
    """A random invocation of each script as a real process (seeded), through the script's own error handler (two
    seconds each: torch's import)."""
    rng = random.Random(27)
    files = tree / "proc_files"
    files.mkdir(exist_ok=True)
    before = snapshot(tree / "cwd")
    for script in SCRIPTS:
        base, defaults, notes = base_argv(script, tree)
        k = rng.choice(sorted(defaults))
        argv = base + [f"--{k}={rng.choice(TEXTS)}"]
        status, stdout, stderr = run_process(script, argv, tree / "cwd")
        assert_answered(status, stdout, stderr, f"python {script} {' '.join(argv)}")
    assert snapshot(tree / "cwd") == before


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--block_size=0"], "error: block_size=0: expected an integer from 1 to 4096"),  # was a ZeroDivisionError
        (["--device=cuda"], "error: device=cuda: expected a device this machine has: auto, cpu"),  # RuntimeError
    ],
)
def test_issue_examples_unstopped(tree, argv, message):
    """The issue's two examples, as a user types them (nothing stopped; a data folder that exists, as after the Quick
    start's prepare.py): one error line each, exit 2."""
    argv = ["config/tiny_cpu.py", f"--data_dir={tree / 'folder'}", *argv]
    status, stdout, stderr = run_process("train.py", argv, REPO, stop=False)
    assert (status, stderr.strip()) == (2, message)
