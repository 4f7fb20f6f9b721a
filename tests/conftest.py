"""Shared fixtures: a tiny prepared dataset and a helper that runs a script as a user would."""

import atexit
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import forkserver
import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
# One thread for the tests' own torch work too, as run() gives every script, set before torch is imported: the
# tests' matrices are tiny, and on a busy two-core machine OpenMP's second thread made them 5x slower (spinning).
os.environ.setdefault("OMP_NUM_THREADS", "1")

# Tiny model settings for subprocess runs: a few seconds per run on two CPU cores.
TINY = [
    "--device=cpu",
    "--n_layer=2",
    "--n_head=2",
    "--n_embd=64",
    "--mlp_hidden=128",
    "--block_size=64",
    "--batch_size=4",
    "--compile=false",
    "--eval_iters=2",
    "--warmup_iters=2",
    "--log_interval=1",
]


# startup environment -> forkserver.ForkServer started in it: one for each environment met twice (torch.compile,
# run in this process by some tests, sets TORCHINDUCTOR_* for every later run; a one-off environment gets none)
FORK_SERVERS, SEEN = {}, set()


def run(script, *args, check=True, timeout=300, cmd=None, env=None, stdin=None, fresh=False):
    """Run a repo script in a new process (cwd = repo) and return the CompletedProcess. The process is a fork of a
    tests/forkserver.py server, which has imported torch already, unless fresh=True or the command is not a python
    script: then a plain subprocess, as for a first run in an environment that differs where Python and torch read it
    at start."""
    env = dict(env or os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    argv = [*(cmd or [sys.executable, str(REPO / script)]), *map(str, args)]
    key, forkable = forkserver.startup_env(env), not fresh and forkserver.forkable(argv)
    if forkable and key in SEEN and key not in FORK_SERVERS:
        FORK_SERVERS[key] = forkserver.ForkServer(env)
        atexit.register(FORK_SERVERS[key].close)
    SEEN.add(key)
    if forkable and key in FORK_SERVERS:
        proc = FORK_SERVERS[key].run(argv, REPO, env, stdin, timeout)
    else:
        proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env, input=stdin)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def patched(script, *args, check=True, **seams):
    """run() through tests/patched.py, with its seams (FAKE_OOM=..., FORCE_VAL=..., RECORD_SHAPES=...) set."""
    cmd = [sys.executable, str(REPO / "tests" / "patched.py"), str(REPO / script)]
    return run(script, *args, check=check, cmd=cmd, env={**os.environ, **{k: str(v) for k, v in seams.items()}})


def assert_memory_fields(records):
    """Every step record has device memory now and at its peak and the process's RSS, in GiB, and they are sound."""
    steps = [r for r in records if "loss" in r]
    assert steps
    for r in steps:
        assert 0 <= r["mem_gib"] <= r["peak_mem_gib"] < 64 and 0.01 < r["rss_gib"] < 64, r
    # a peak does not fall (on the CPU, where the kernel's RSS counters lag by a few pages, not by more than a hair)
    peaks = [r["peak_mem_gib"] for r in steps]
    assert all(later > earlier - 0.01 for earlier, later in zip(peaks, peaks[1:], strict=False)), peaks


def stdlib_sample(n=60):
    """The first n standard-library modules, as (name, text): real Python text for the tests' corpus."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.glob("*.py")):
        text = path.read_text(encoding="utf-8")
        if text.strip():
            docs.append((path.name, text))
        if len(docs) == n:
            break
    return docs


def documents_in(folder):
    """Decode every shard of a folder back into its documents (each starts with the boundary token)."""
    from shards import open_shard  # repo modules import once sys.path holds REPO
    from tokenizer import load_tokenizer

    tok = load_tokenizer(folder / "tokenizer.model")
    manifest = json.loads((folder / "manifest.json").read_text())
    docs = {}
    for split in ("train", "val"):
        tokens = np.concatenate([open_shard(folder / s["name"]) for s in manifest["shards"] if s["split"] == split])
        bounds = list(np.flatnonzero(tokens == tok.bos_id)) + [len(tokens)]
        docs[split] = [tok.decode(tokens[a + 1 : b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    return docs, manifest


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A data folder made by prepare.py from 60 standard-library files with a 512-token vocabulary."""
    root = tmp_path_factory.mktemp("corpus")
    src = root / "src"
    src.mkdir()
    for name, text in stdlib_sample():
        (src / f"{name}.txt").write_text(text, encoding="utf-8")
    data = root / "data"
    run("prepare.py", f"--input={src}", f"--data_dir={data}", "--vocab_size=512", "--val_permille=100")
    return data


@pytest.fixture(scope="session")
def short_docs(tmp_path_factory):
    """A data folder of short documents (each 6 lines of a standard-library module, ~40 tokens), so that most
    64-token windows cross a document boundary: for doc_mask."""
    root = tmp_path_factory.mktemp("short")
    src = root / "src"
    src.mkdir()
    for name, text in stdlib_sample(20):
        lines = text.splitlines(keepends=True)
        for i in range(0, len(lines), 6):
            (src / f"{name}_{i}.txt").write_text("".join(lines[i : i + 6]), encoding="utf-8")
    data = root / "data"
    run("prepare.py", f"--input={src}", f"--data_dir={data}", "--vocab_size=512", "--val_permille=100")
    return data


@pytest.fixture(scope="session")
def sft_base(tiny_data, tmp_path_factory):
    """A 20-step base run on tiny_data and the demo SFT conversations prepared with its tokenizer: (base run folder,
    SFT data folder). Shared by sft_run and tests/test_sft.py, which only read them."""
    root = tmp_path_factory.mktemp("sft_base")
    base, sft_data = root / "base", root / "sft_data"
    run("train.py", f"--data_dir={tiny_data}", f"--out_dir={base}", *TINY, "--max_iters=20", "--eval_interval=20")
    run(
        "prepare.py",
        "--mode=sft",
        f"--data_dir={sft_data}",
        f"--tokenizer={base / 'tokenizer.model'}",
        "--block_size=64",
    )
    return base, sft_data


@pytest.fixture(scope="session")
def sft_run(sft_base, tmp_path_factory):
    """A tiny SFT run and DPO demo pairs made with its tokenizer: (sft run folder, dpo data folder). Shared by the
    DPO and export tests."""
    root = tmp_path_factory.mktemp("dpo")
    (base, sft_data), sft, dpo_data = sft_base, root / "sft", root / "dpo_data"
    tokenizer = f"--tokenizer={base / 'tokenizer.model'}"
    run(
        "sft.py",
        f"--init_from={base}",
        f"--data_dir={sft_data}",
        f"--out_dir={sft}",
        "--device=cpu",
        "--batch_size=8",
        "--max_iters=60",  # at lr_frac=1.0 (AdamW at 0.006, was 0.01) 30 steps no longer learned to end a turn
        "--eval_interval=30",
        "--eval_iters=1",
        "--max_new_tokens=4",
        "--num_samples=1",
        "--lr_frac=1.0",
        "--replay=0",  # the model the DPO and export tests start from, as before replay (tested in test_sft.py)
    )
    run("prepare.py", "--mode=dpo", f"--data_dir={dpo_data}", tokenizer, "--block_size=64")
    return sft, dpo_data


@pytest.fixture(scope="session")
def tree(tmp_path_factory):
    """An empty working folder, and folders and a file that exist for the config keys that want them (the fuzz and
    bounds tests)."""
    root = tmp_path_factory.mktemp("fuzz")
    for d in ("cwd", "folder/sub"):
        (root / d).mkdir(parents=True)
    (root / "folder" / "file.txt").write_text("not a shard, not a checkpoint, not a tokenizer\n")
    return root
