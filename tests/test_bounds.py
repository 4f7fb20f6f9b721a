"""Every numeric config key at the edges of what it accepts (issue 35: prepare.py took --batch_docs=10**20, wrote its
first files, then died in islice with a traceback; train.py took --muon_momentum=1.0 and froze every hidden matrix).

A key's edges are the numbers its declaration names (accepts.py: between(1, 4096) names 1 and 4096, at_least(0,
below=1) names 0 and 1), and besides them a huge number (10**20), a very negative one and, for a float key, a tiny one
(1e-20). Each must be refused before any work, in one `error:` line, or work: test_edges_are_refused_or_accepted asks
every script (up to where its work would start), and test_accepted_edges_run runs the training scripts and
prepare.py with the values they accept, a few real optimizer steps each.
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

try:  # each also imported once here: MetricsLog's (0.15 s), prepare.py's (1.1 s)
    import torch.utils.tensorboard  # noqa: F401
except ImportError:
    pass
try:
    import datasets  # noqa: F401
except ImportError:
    pass

HUGE = 10**20


def numeric_keys(script, cwd):
    """{key: (int or float, its declaration)} of a script's numeric config keys (a bool is not one)."""
    defaults, notes = declared(script, cwd)
    keys = {}
    for k, default in defaults.items():
        a = notes.get(k)
        kind = a.kind if isinstance(a, Accepts) and default == "auto" and a.kind else type(default)
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

# Keys whose largest value asks for more than a tiny run on two cores has (memory, time, disk, the data's vocabulary):
# that value runs alone, and ends in one error line or at the runner's time limit. A value missing here costs only
# time: a run that stops before its second step is run again in halves until each value has run alone.
ALONE = {"eval_iters", "keep_last", "batch_size", "block_size", "gradient_accumulation_steps", "global_batch_size"}
ALONE |= {"vocab_size", "n_layer", "n_embd", "mlp_hidden"}


class Stop(BaseException):  # not an Exception: no script's own `except Exception` may take it
    """A forked run has done its steps, or used its time."""


def run_forked(script, argv, cwd, steps=3, seconds=1.5, memory=2**30):
    """(exit status, stdout, stderr) of `python script argv` in a fork of this process (torch imported already), as
    the script's own error handler ends it, stopped at the start of optimizer step steps + 1 or after seconds of CPU
    time (stdout then says `stopped by steps` or `stopped by time`; its last line is `optimizer steps: N`). Its
    address space may grow by memory bytes: a size past that is the script's `error: out of memory` line at once,
    never a machine swapping."""
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


def run_stopped(script, argv, cwd, steps, seconds):
    """The child's part of run_forked: the script's exit status."""
    step, done = muon.Muon.step, []

    def counted(self, *args, **kwargs):
        if len(done) == steps:
            raise Stop(f"steps ({steps})")
        done.append(1)
        return step(self, *args, **kwargs)

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
        print(f"optimizer steps: {len(done)}")
    return 0


@pytest.fixture(scope="module")
def short_runs(tiny_data, sft_base, sft_run, tmp_path_factory):
    """{script: its command for a short run at the tiny size, less the output folder}: three optimizer steps, an
    evaluation and a checkpoint at step 2 and at the end (prepare.py: six files, a 400-token tokenizer)."""
    (base, sft_data), (sft, dpo_data) = sft_base, sft_run
    src = tmp_path_factory.mktemp("bounds_src")
    for name in sorted(os.listdir(tiny_data.parent / "src"))[:6]:
        (src / name).write_bytes((tiny_data.parent / "src" / name).read_bytes())
    every = ["--max_iters=3", "--eval_interval=2", "--ckpt_interval=2", "--log_interval=1", "--warmup_iters=2"]
    tuned = ["--device=cpu", "--eval_iters=1", *every]
    return {
        "train.py": [str(REPO / "config" / "tiny_cpu.py"), f"--data_dir={tiny_data}", *TINY, *every],
        "sft.py": [f"--init_from={base}", f"--data_dir={sft_data}", "--batch_size=4", "--max_new_tokens=4", *tuned],
        "dpo.py": [f"--init_from={sft}", f"--data_dir={dpo_data}", "--batch_size=2", *tuned],
        "prepare.py": [f"--input={src}", "--vocab_size=400", "--val_permille=100"],
    }


def groups_of(accepted):
    """{key: its accepted values, ascending} as few groups {key: value} as can run together: every key's smallest
    value, every key's largest (alone for a key in ALONE), then the values between."""
    low, high, alone, middle = {}, {}, [], []
    for k, values in accepted.items():
        low[k] = values[0]
        if len(values) > 1 and k in ALONE:
            alone.append({k: values[-1]})
        elif len(values) > 1:
            high[k] = values[-1]
        for i, v in enumerate(values[1:-1]):
            middle[i:] = middle[i:] or [{}]
            middle[i][k] = v
    return [g for g in (low, high, *middle) if g] + alone


def halves(group):
    items = list(group.items())
    return [dict(items[: len(items) // 2]), dict(items[len(items) // 2 :])]


@pytest.mark.parametrize("script", ["train.py", "sft.py", "dpo.py", "prepare.py"])
def test_accepted_edges_run(script, short_runs, tmp_path):
    """Every edge value the training scripts and prepare.py take runs: three real optimizer steps with evaluation
    and checkpoints (prepare.py: to its end), or a stop in one `error:` line where the value asks for more than is
    there (memory, disk, a loss that is no longer finite), never a traceback. The values run together in few runs;
    a run that stops before its second step runs again in halves, so that no value hides another."""
    out = "--data_dir" if script == "prepare.py" else "--out_dir"
    base = short_runs[script]
    accepted = {}
    for k, (kind, a) in numeric_keys(script, tmp_path).items():
        argvs = {kind(text): [*base, f"{out}={tmp_path / 'x'}", f"--{k}={text}"] for text in edges(kind, a)}
        values = sorted(v for v, argv in argvs.items() if run_in_process(script, argv, tmp_path)[0] == 0)
        if values:
            accepted[k] = values
    todo, runs = groups_of(accepted), 0
    while todo:
        group = todo.pop(0)
        argv = [*base, f"{out}={tmp_path / 'x'}", *as_args(group)]
        if len(group) > 1 and run_in_process(script, argv, tmp_path)[0] != 0:  # a rule relating two of them
            todo[:0] = halves(group)
            continue
        runs += 1
        argv = [*base, f"{out}={tmp_path / str(runs)}", *as_args(group)]
        import time; t0 = time.time()
        status, stdout, stderr = run_forked(script, argv, tmp_path)
        print("DBG", f"{time.time()-t0:.2f}", status, group, stdout.strip().splitlines()[-2:], stderr.strip()[-150:])
        assert_answered(status, stdout, stderr, f"python {script} {' '.join(argv)}")
        steps = int(stdout.split("optimizer steps: ")[-1])
        if len(group) > 1 and steps < 2 and (status != 0 or "stopped by time" in stdout):
            todo[:0] = halves(group)
    print(f"{script}: {sum(map(len, accepted.values()))} values in {runs} runs")


def as_args(group):
    return [f"--{k}={v}" for k, v in group.items()]
