"""compare.sh's peers, with a stand-in `python` that logs each command (and answers the sweep's ranking; the config's
batch is read by the real python): by default ours, AdamW's sweep and its two best rates, nanoGPT's GPT-2 and the two
comparisons; PEERS=nanogpt ours and nanoGPT's only, compared, on equal tokens at their own batches; an unknown or
empty PEERS, or a config whose batch does not divide nanoGPT's, is one error line before anything runs."""

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

FAKE_PYTHON = """#!/usr/bin/env bash
if [ "$1" = - ] && [[ "$2" == *.py ]]; then exec python3 "$@"; fi  # the config's batch: the real python reads it
echo "$*" >>"$FAKE_LOG"
if [ "$1" = - ]; then echo "0.002 0.001"; fi  # the sweep's ranking: best, second, no rate to add
"""


def compare(tmp_path, **extra_env):
    """Run compare.sh with the stand-in python: (process, the commands it ran, the runs' prefix)."""
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "python").write_text(FAKE_PYTHON)
    (tmp_path / "bin" / "python").chmod(0o755)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "manifest.json").write_text("{}")  # prepared: no prepare.py
    log, prefix = tmp_path / "log", tmp_path / "cmp"
    env = dict(os.environ, PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}", FAKE_LOG=str(log), TMPDIR=str(tmp_path))
    env.update(DATA=str(tmp_path / "data"), PREFIX=str(prefix), **extra_env)
    proc = subprocess.run(["bash", str(REPO / "compare.sh")], env=env, capture_output=True, text=True, timeout=60)
    return proc, log.read_text().splitlines() if log.exists() else [], str(prefix)


def out_dir(command):
    return next(arg.split("=", 1)[1] for arg in command.split() if arg.startswith("--out_dir="))


def test_by_default_adamw_is_swept_and_both_peers_are_compared(tmp_path):
    proc, commands, p = compare(tmp_path)
    assert proc.returncode == 0, proc.stderr
    trained = [out_dir(c) for c in commands if c.startswith("train.py")]
    assert trained == [f"{p}_muon", f"{p}_sweep_0.001", f"{p}_sweep_0.002", f"{p}_sweep_0.004"] + [
        f"{p}_adamw_0.002",
        f"{p}_adamw_0.001",
        f"{p}_nanogpt",
    ]
    evals = [c for c in commands if c.startswith("eval.py")]
    assert f"--compare={p}_adamw_0.002,{p}_adamw_0.001,{p}_nanogpt " in evals[0] and out_dir(evals[0]) == f"{p}_muon"
    assert out_dir(evals[1]) == f"{p}_adamw_0.002" and len(evals) == 2


def test_peers_nanogpt_runs_ours_and_nanogpts_only(tmp_path):
    proc, commands, p = compare(tmp_path, PEERS="nanogpt", STEPS="7")
    assert proc.returncode == 0, proc.stderr
    assert [out_dir(c) for c in commands] == [f"{p}_muon", f"{p}_nanogpt", f"{p}_muon"]
    # equal tokens: ours 28 steps of the config's 128K, nanoGPT 7 of 512K with a warmup of its own (NANOGPT_WARMUP)
    assert "--max_iters=28" in commands[0] and "--gradient_accumulation_steps" not in commands[0]
    nanogpt = "--max_iters=7 --gradient_accumulation_steps=16 --warmup_iters=30 --arch=nanogpt"
    assert nanogpt in commands[1], commands[1]
    assert commands[2].startswith("eval.py") and f"--compare={p}_nanogpt --tasks=curves" in commands[2]


def test_an_unknown_or_empty_peer_is_one_error_line_and_nothing_runs(tmp_path):
    for i, peers in enumerate(["nanogpt gpt4", " "]):
        (tmp_path / str(i)).mkdir()
        proc, commands, _ = compare(tmp_path / str(i), PEERS=peers)
        assert proc.returncode == 1 and not commands
        assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: PEERS"), proc.stderr


def test_a_config_whose_batch_does_not_divide_nanogpts_or_is_not_set_is_one_error_line(tmp_path):
    config = tmp_path / "odd.py"
    config.write_text("batch_size = 3\nblock_size = 2048\ngradient_accumulation_steps = 5\nwarmup_iters = 10\n")
    (tmp_path / "run").mkdir()
    proc, commands, _ = compare(tmp_path / "run", CONFIG=str(config))
    assert proc.returncode == 1 and not commands
    assert proc.stderr.count("\n") == 1 and "30,720 tokens a step" in proc.stderr, proc.stderr
    config.write_text("batch_size = 4\n")  # the rest left to train.py's defaults: compare.sh cannot scale them
    (tmp_path / "run2").mkdir()
    proc, commands, _ = compare(tmp_path / "run2", CONFIG=str(config))
    assert proc.returncode == 1 and not commands and proc.stderr.count("\n") == 1, proc.stderr
    assert "does not set block_size, gradient_accumulation_steps (whole numbers)" in proc.stderr, proc.stderr
