"""reference.sh's orchestration, with a stand-in `python` that logs each command's start and end: the CPU stages run
beside the GPU stages, each stage waits for what it needs, and a failed background stage stops the run with one
error line and no stage after it."""

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

FAKE_PYTHON = """#!/usr/bin/env bash
echo "$(date +%s.%N) start $*" >>"$FAKE_LOG"
case "$*" in *"$FAKE_FAIL"*) exit 3 ;; esac
sleep 0.8
echo "$(date +%s.%N) end $*" >>"$FAKE_LOG"
"""

STAGES = {  # a fragment of each command -> the stage's name
    "--corpus=python --vocab_size": "prepare corpus",
    "--mode=sft": "prepare sft",
    "--mode=dpo": "prepare dpo",
    "train.py": "pretrain",
    "sft.py": "sft",
    "dpo.py": "dpo",
    "--out_dir=RUN --gen": "eval ref",
    "--out_dir=RUN_sft --gen": "eval ref_sft",
    "--out_dir=RUN_dpo --gen": "eval ref_dpo",
    "--out_dir=RUN_dpo_sampled --gen": "eval ref_dpo_sampled",  # DPO_PAIRS=sampled
    "--card": "card",
}


def reference(tmp_path, fail="never-matches", **extra_env):
    """Run reference.sh with the stand-in python: (process, {stage: (start, end)}); the commands are kept in
    reference.commands."""
    (tmp_path / "bin").mkdir()
    fake = tmp_path / "bin" / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    log, run = tmp_path / "log", tmp_path / "ref"
    env = dict(os.environ, PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}", FAKE_LOG=str(log), FAKE_FAIL=fail)
    env.update(RUN=str(run), DATA=str(tmp_path / "data"), **extra_env)
    proc = subprocess.run(["bash", str(REPO / "reference.sh")], env=env, capture_output=True, text=True, timeout=60)
    times, reference.commands = {}, {}
    for line in log.read_text().splitlines() if log.exists() else []:
        t, what, command = line.split(" ", 2)
        command = command.replace(str(run), "RUN")
        names = [name for fragment, name in STAGES.items() if fragment in command]
        assert len(names) == 1, command
        times.setdefault(names[0], {})[what] = float(t)
        reference.commands[names[0]] = command
    return proc, {name: (t["start"], t.get("end")) for name, t in times.items()}


def test_cpu_stages_run_beside_gpu_stages_and_each_waits_for_its_input(tmp_path):
    proc, t = reference(tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert set(t) == set(STAGES.values()) - {"eval ref_dpo_sampled"}
    start, end = (lambda name: t[name][0]), (lambda name: t[name][1])
    beside = lambda a, b: start(a) < end(b) and start(b) < end(a)  # noqa: E731 (the two ran at the same time)
    # SFT and DPO data are prepared while pretraining runs, from the corpus's tokenizer
    assert end("prepare corpus") <= min(start("prepare sft"), start("prepare dpo"), start("pretrain"))
    assert beside("prepare sft", "pretrain") and beside("prepare dpo", "pretrain")
    # the base model is evaluated beside SFT, the SFT model beside DPO; each stage after its input; the card last
    assert end("pretrain") <= start("eval ref") and beside("eval ref", "sft")
    assert end("sft") <= start("eval ref_sft") and beside("eval ref_sft", "dpo")
    assert end("prepare sft") <= start("sft") and end("prepare dpo") <= start("dpo") and end("sft") <= start("dpo")
    assert end("dpo") <= start("eval ref_dpo")
    assert start("card") >= max(end(name) for name in t if name != "card")
    stages = [line.split("\t")[0] for line in (tmp_path / "ref_card" / "stages.tsv").read_text().splitlines()]
    assert sorted(stages) == sorted([*(name for name in set(t) if name != "card"), "wall"])


def test_sampled_dpo_pairs_are_made_from_the_sft_run_after_it(tmp_path):
    """DPO_PAIRS=sampled: DPO's data is prepared after SFT, from the SFT run's answers (--sample_from), beside the SFT
    model's evaluation, into its own folder, which dpo.py reads, and DPO runs into its own run and card folders; a
    value it does not know is one error line."""
    proc, t = reference(tmp_path, DPO_PAIRS="sampled")
    assert proc.returncode == 0, proc.stderr
    start, end = (lambda name: t[name][0]), (lambda name: t[name][1])
    assert end("sft") <= start("prepare dpo") and end("prepare dpo") <= start("dpo")
    assert start("prepare dpo") < end("eval ref_sft")  # the GPU's two jobs side by side
    assert "--sample_from=RUN_sft" in reference.commands["prepare dpo"]
    assert "--data_dir=data/dpo_python32k_sampled" in reference.commands["prepare dpo"]
    assert "--data_dir=data/dpo_python32k_sampled" in reference.commands["dpo"]
    assert "--out_dir=RUN_dpo_sampled" in reference.commands["dpo"] and "eval ref_dpo_sampled" in t
    assert "RUN_dpo_sampled" in reference.commands["card"] and (tmp_path / "ref_sampled_card" / "stages.tsv").exists()
    (tmp_path / "bad").mkdir()
    proc, t = reference(tmp_path / "bad", DPO_PAIRS="on-policy")
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "DPO_PAIRS=on-policy" in errors[0] and not t


def test_a_failed_background_stage_stops_the_run_with_one_error_line(tmp_path):
    proc, t = reference(tmp_path, fail="--mode=sft")
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "prepare sft failed" in errors[0] and "prepare_sft.log" in errors[0], proc.stderr
    assert "sft" not in t and "dpo" not in t and "card" not in t  # nothing that needs its data ran
    assert t["pretrain"][1] is not None  # the stage in front finished first


def test_the_card_shows_the_wall_time_beside_the_stages_and_the_gpu_busy_share(tmp_path):
    import json
    import sys

    sys.path.insert(0, str(REPO))
    import reports

    run, card = tmp_path / "run", tmp_path / "card"
    run.mkdir(), card.mkdir()
    report = {"kind": "pretrain", "run": str(run), "date": "2026-12-03", "device": "cpu", "command": "python x"}
    (run / "report.json").write_text(json.dumps(report))
    # two stages side by side (the sum, 150 s, is not the wall time), pretraining resumed once, then the wall time
    (card / "stages.tsv").write_text("prepare corpus\t20\npretrain\t60\nprepare sft\t40\npretrain\t30\nwall\t95\n")
    (card / "gpu_util.csv").write_text("0\n0\n100\n98\n50\n0\n100\n100\n")
    text = reports.write_card([run], card)
    assert "| pretrain | 90 |" in text and "| stages summed | 150 |" in text
    assert "| **nothing to card** | **95** |" in text
    assert "GPU busy (nvidia-smi, a sample a second): 62.5% of 8 s, mean utilisation 56.0%" in text
    saved = json.loads((card / "card.json").read_text())
    assert saved["stages_s"]["wall"] == 95 and saved["gpu"]["busy"] == 0.625
