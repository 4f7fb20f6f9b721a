"""Every numeric config key at the edges of what it accepts (issue 35: prepare.py took --batch_docs=10**20, wrote its
first files, then died in islice with a traceback; train.py took --muon_momentum=1.0 and froze every hidden matrix).

A key's edges are the numbers its declaration names (accepts.py: between(1, 4096) names 1 and 4096, at_least(0,
below=1) names 0 and 1), and besides them a huge number (10**20), a very negative one and, for a float key, a tiny one
(1e-20). Each must be refused before any work, in one `error:` line, or work: test_edges_are_refused_or_accepted asks
every script (up to where its work would start); test_train_runs_at_its_edges runs train.py with every value it
takes, a few real optimizer steps each, and test_prepare_runs_at_its_edges prepare.py's with the keys of its run.
"""

import os
import resource
import runpy
import signal
import sys
import tempfile

import pytest
import torch._dynamo  # noqa: F401 (imported once here, not in each forked run: the optimizer's, 1.5 s)
from conftest import REPO, TINY
from test_fuzz_config import SCRIPTS, assert_answered, base_argv, declared, run_in_process

import muon
from accepts import Accepts

try:  # also imported once here: MetricsLog's (0.15 s)
    import torch.utils.tensorboard  # noqa: F401
except ImportError:
    pass

HUGE = 10**20


def numeric_keys(script, cwd):
    """{key: (int or float, its declaration)} of a script's numeric config keys (a bool is not one)."""
    defaults, notes = declared(script, cwd)
    keys = {}
    for k, default in defaults.items():
        a = notes.get(k)
        kind = (a.kind if isinstance(a, Accepts) else None) or type(default)  # as runtime.configure's
        if kind in (int, float):
            keys[k] = kind, a
    return keys


def edges(kind, a):
    """The values tried for a key, as the command line writes them: its declaration's edges, a huge and a very
    negative number, and a float key's tiny one."""
    values = [*a.edges, HUGE, -HUGE] if kind is int else [*a.edges, float(HUGE), -float(HUGE), 1e-20]
    return list(dict.fromkeys(str(kind(v)) for v in values))


@pytest.mark.parametrize("script", SCRIPTS)
def test_edges_are_refused_or_accepted(script, tree):
    """Every numeric key of every script, at each of its edges: a value outside the declaration is refused in one
    line that names the key; one inside is taken (or refused in one line by a rule relating keys)."""
    base, _, _ = base_argv(script, tree)
    for k, (kind, a) in numeric_keys(script, tree / "cwd").items():
        for text in edges(kind, a):
            status, stdout, stderr = run_in_process(script, [*base, f"--{k}={text}"], tree / "cwd")
            what = f"python {script} ... --{k}={text}"
            assert_answered(status, stdout, stderr, what)
            if not a(kind(text)):
                assert status == 2 and stderr.startswith(f"error: {k}="), f"{what} is outside {a.what}: {stderr}"


# ----------------------------------------------------------------------------- short runs

# Keys whose larger values ask for more than a tiny run on two cores has (memory, time, disk, the data's vocabulary):
# each such value above 1 runs alone, and ends in one error line or at the runner's CPU-time limit. A key missing here
# costs only time: a run with no step of finite gradients is run again in halves until each value has run alone.
ALONE = {"eval_iters", "keep_last", "batch_size", "block_size", "gradient_accumulation_steps", "global_batch_size"}
ALONE |= {"vocab_size", "n_layer", "n_embd", "mlp_hidden"}
# Keys that decide which of two others is used: each runs its smallest value with the others' largest, and its largest
# with their smallest (muon_momentum_warmup at 10**20 would run muon_momentum_start in place of the largest
# muon_momentum, so momentum 1.0 would pass unseen).
SWAPPED = {"muon_momentum_warmup"}


class Stop(BaseException):  # not an Exception: no script's own `except Exception` may take it
    """A forked run has done its steps, or used its time."""


def run_forked(script, argv, cwd, steps=3, seconds=0.4, memory=2**30):
    """(exit status, stdout, stderr) of `python script argv` in a fork of this process (torch imported already), as
    the script's own error handler ends it, stopped at the start of optimizer step steps + 1 or after seconds of CPU
    time (stdout then says `stopped by steps` or `stopped by time`; its last lines are `optimizer steps: N, F with
    finite gradients` and `frozen matrices: M`). Its address space may grow by memory bytes: a size past that is the
    script's `error: out of memory` line at once, never a machine swapping."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        pid = os.fork()
        if pid == 0:  # the child: never returns
            code = 1
            try:
                os.dup2(out.fileno(), 1)
                os.dup2(err.fileno(), 2)
                sys.stdout, sys.stderr = os.fdopen(1, "w"), os.fdopen(2, "w")
                with open("/proc/self/statm") as f:
                    size = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
                resource.setrlimit(resource.RLIMIT_AS, (size + memory, resource.RLIM_INFINITY))
                code = run_stopped(script, argv, cwd, steps, seconds)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        out.seek(0)
        err.seek(0)
        return os.waitstatus_to_exitcode(status), out.read(), err.read()


def frozen(optimizer):
    """Hidden matrices with a finite, non-zero gradient whose Muon momentum buffer is still zero after a step: their
    update (Nesterov: the gradient lerped to the buffer by the momentum) is zero at momentum 1, so they never move.
    (A later gradient that is not finite makes the buffer NaN: hence each step is asked.)"""
    return {
        id(p)
        for group in optimizer.param_groups
        if group["use_muon"]
        for p in group["params"]
        if p.grad is not None and p.grad.any() and p.grad.isfinite().all()
        if not optimizer.state[p]["momentum_buffer"].any()
    }


def run_stopped(script, argv, cwd, steps, seconds):
    """The child's part of run_forked: the script's exit status."""
    step, done, still = muon.Muon.step, [], set()

    def counted(self, *args, **kwargs):
        if len(done) == steps:
            raise Stop(f"steps ({steps})")
        done.append(all(p.grad.isfinite().all() for g in self.param_groups for p in g["params"] if p.grad is not None))
        loss = step(self, *args, **kwargs)
        still.update(frozen(self))
        return loss

    def alarm(signum, frame):
        raise Stop(f"time ({seconds} s of CPU, {len(done)} steps)")

    muon.Muon.step = counted
    signal.signal(signal.SIGPROF, alarm)
    signal.setitimer(signal.ITIMER_PROF, seconds)  # CPU time: the same work however busy the machine is
    os.chdir(cwd)
    sys.argv = [str(REPO / script), *map(str, argv)]
    try:
        try:
            runpy.run_path(sys.argv[0], run_name="__main__")
        except Stop as e:
            print(f"stopped by {e}")
        except SystemExit as e:
            return e.code if isinstance(e.code, int) else int(e.code is not None)
        except BaseException:
            sys.excepthook(*sys.exc_info())  # the script's handler: an error line and exit 2, or a traceback
            return 1
    except SystemExit as e:
        return e.code
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        print(f"optimizer steps: {len(done)}, {sum(done)} with finite gradients")
        print(f"frozen matrices: {len(still)}")
    return 0


def groups_of(accepted):
    """{key: its accepted values, ascending} as few groups {key: value} as can run together: every key's smallest
    value, every key's largest (for a key in SWAPPED the other way round), then the values between; a value above 1
    of a key in ALONE runs alone."""
    low, high, alone, middle = {}, {}, [], []
    for k, values in accepted.items():
        if k in ALONE:
            if values[0] <= 1:
                low[k] = values[0]
            alone += [{k: v} for v in values if v > 1]
            continue
        low[k], high[k] = (values[-1], values[0]) if k in SWAPPED else (values[0], values[-1])
        for i, v in enumerate(values[1:-1]):
            middle[i:] = middle[i:] or [{}]
            middle[i][k] = v
    return [g for g in (low, high, *middle) if g] + alone


def halves(group):
    items = list(group.items())
    return [dict(items[: len(items) // 2]), dict(items[len(items) // 2 :])]


def as_args(group):
    return [f"--{k}={v}" for k, v in group.items()]


def accepted_edges(script, base, keys, cwd):
    """{key: the values of its edges that `script base --key=value` takes, ascending} for the numeric keys in keys."""
    accepted = {}
    for k, (kind, a) in numeric_keys(script, cwd).items():
        values = [
            kind(t) for t in edges(kind, a) if k in keys and run_in_process(script, [*base, f"--{k}={t}"], cwd)[0] == 0
        ]
        if values:
            accepted[k] = sorted(values)
    return accepted


def test_train_runs_at_its_edges(tiny_data, tmp_path):
    """Every edge value train.py takes runs (issue 35: --muon_momentum=1.0 ran and froze every hidden matrix): three
    real optimizer steps on a tiny model, with an evaluation and a checkpoint at step 2 and at the end, and no hidden
    matrix that has a gradient left without an update; or a stop in one `error:` line where the value asks for more
    than there is (memory, disk, the data's vocabulary; a loss that is no longer finite), or at the CPU-time limit.
    The values run together in few runs; a run with no step of finite gradients runs again in halves, so that no value
    hides another."""
    every = ["--max_iters=3", "--eval_interval=2", "--ckpt_interval=2", "--eval_iters=1", "--batch_size=2"]
    base = [str(REPO / "config" / "tiny_cpu.py"), f"--data_dir={tiny_data}", *TINY, *every, f"--out_dir={tmp_path}/x"]
    keys = set(numeric_keys("train.py", tmp_path)) - {"n_head"}  # n_head's edges fail n_embd's rule (a multiple)
    todo, runs = groups_of(accepted_edges("train.py", base, keys, tmp_path)), 0
    assert len(todo) > 2
    while todo:
        group = todo.pop(0)
        if len(group) > 1 and run_in_process("train.py", [*base, *as_args(group)], tmp_path)[0] != 0:
            todo[:0] = halves(group)  # a rule relating two of them
            continue
        runs += 1
        argv = [*base, *as_args(group), f"--out_dir={tmp_path / str(runs)}"]
        status, stdout, stderr = run_forked("train.py", argv, tmp_path)
        what = f"python train.py {' '.join(argv)}"
        assert_answered(status, stdout, stderr, what)
        assert stdout.endswith("frozen matrices: 0\n"), f"{what}: a hidden matrix never moves\n{stdout[-500:]}"
        finite = int(stdout.split("optimizer steps: ")[-1].split()[1])
        if len(group) > 1 and finite == 0:  # a value that stops a run, or makes its gradients NaN, hides the others
            todo[:0] = halves(group)
    assert runs < 30


# (shard_tokens=1 works too, a shard per token: 20 s for these four files)
PREPARE_RUN_KEYS = {"batch_docs", "num_threads", "max_shards", "tokenizer_docs"}


def test_prepare_runs_at_its_edges(tiny_data, tmp_path):
    """prepare.py runs to its end at every edge value it takes of the keys that size its reading and writing (issue
    35: --batch_docs=10**20 passed the checks, wrote manifest.json and tokenizer.model, then died in islice with a
    traceback): all smallest values in one run, all largest in another."""
    src = tmp_path / "src"
    src.mkdir()
    for path in sorted((tiny_data.parent / "src").iterdir())[:4]:
        (src / path.name).write_bytes(path.read_bytes())
    base = [f"--input={src}", "--vocab_size=400", "--val_permille=100", f"--data_dir={tmp_path}/x"]
    accepted = accepted_edges("prepare.py", base, PREPARE_RUN_KEYS, tmp_path)
    assert set(accepted) == PREPARE_RUN_KEYS
    for i, end in enumerate((0, -1)):
        argv = [*base, *(f"--{k}={values[end]}" for k, values in accepted.items()), f"--data_dir={tmp_path / str(i)}"]
        # 30 s of CPU: 5 s ran out in the whole suite, never alone; likely the largest num_threads, whose 128 forks
        # each copy the page tables of this process, a long pytest worker with a large heap (not measured)
        status, stdout, stderr = run_forked("prepare.py", argv, tmp_path, seconds=30)
        assert_answered(status, stdout, stderr, f"python prepare.py {' '.join(argv)}")
        assert status == 0 and (tmp_path / str(i) / "manifest.json").exists(), stdout[-500:] + stderr
