"""reference.sh's orchestration, with a stand-in `python` that logs each command's start and end: the CPU stages run
beside the GPU stages, each stage waits for what it needs, and a failed background stage stops the run with one
error line and no stage after it."""

import json
import os
import signal
import subprocess
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

FAKE_PYTHON = """#!/usr/bin/env bash
echo "$(date +%s.%N) start $*" >>"$FAKE_LOG"
case "$*" in *"$FAKE_FAIL"*) exit 3 ;; esac
sleep 0.8
echo "$(date +%s.%N) end $*" >>"$FAKE_LOG"
"""

STAGES = {  # a fragment of each command -> the stage's name
    "bench.py": "warm compile",  # on a GPU only
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


def reference(tmp_path, fail="never-matches", gpu=False, **extra_env):
    """Run reference.sh with the stand-in python (and with gpu, a stand-in nvidia-smi): (process, {stage: (start,
    end)}); the commands are kept in reference.commands."""
    (tmp_path / "bin").mkdir(exist_ok=True)
    for name, text in [("python", FAKE_PYTHON)] + [("nvidia-smi", "#!/usr/bin/env bash\n")] * gpu:
        (tmp_path / "bin" / name).write_text(text)
        (tmp_path / "bin" / name).chmod(0o755)
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
    assert set(t) == set(STAGES.values()) - {"eval ref_dpo_sampled", "warm compile"}  # no nvidia-smi: no warm-up
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


def test_on_a_gpu_pretrainings_compile_is_warmed_beside_the_corpus_and_a_failure_there_costs_nothing(tmp_path):
    proc, t = reference(tmp_path, gpu=True)
    assert proc.returncode == 0, proc.stderr
    start, end = (lambda name: t[name][0]), (lambda name: t[name][1])
    assert start("warm compile") < end("prepare corpus") and end("warm compile") <= start("pretrain")
    command = reference.commands["warm compile"]
    assert command.startswith("bench.py config/reference_137m.py --compile_modes=regions --seq_lens=2048"), command
    assert command.endswith("--out=RUN_card/warm_compile.json")  # a user's out/bench.json stays
    assert "warm compile" in (tmp_path / "ref_card" / "stages.tsv").read_text()
    (tmp_path / "ref").mkdir(exist_ok=True)
    (tmp_path / "ref" / "ckpt_0000002.safetensors").write_bytes(b"")  # pretraining under way: its graphs exist
    (tmp_path / "log").unlink()
    proc, t = reference(tmp_path, gpu=True)
    assert proc.returncode == 0 and "warm compile" not in t and "pretrain" in t, proc.stderr
    (tmp_path / "failed").mkdir()
    proc, t = reference(tmp_path / "failed", fail="bench.py", gpu=True)
    assert proc.returncode == 0 and t["card"][1] is not None, proc.stderr
    log = (tmp_path / "failed" / "ref_card" / "warm_compile.log").read_text()
    assert "warm compile failed: train.py compiles for itself" in log


def test_sampled_dpo_pairs_are_made_from_the_sft_run_after_it(tmp_path):
    """DPO_PAIRS=sampled: DPO's data is prepared after SFT, from the SFT run's answers (--sample_from), beside the SFT
    model's evaluation, into its own folder, which dpo.py reads, and DPO runs into its own run and card folders; a
    value it does not know is one error line. PAIRS_ARGS: keys added to its prepare.py."""
    proc, t = reference(tmp_path, DPO_PAIRS="sampled", PAIRS_ARGS="--sample_n=8 --sample_unjudged=written")
    assert proc.returncode == 0, proc.stderr
    start, end = (lambda name: t[name][0]), (lambda name: t[name][1])
    assert end("sft") <= start("prepare dpo") and end("prepare dpo") <= start("dpo")
    assert start("prepare dpo") < end("eval ref_sft")  # the GPU's two jobs side by side
    assert "--sample_from=RUN_sft" in reference.commands["prepare dpo"]
    assert reference.commands["prepare dpo"].endswith(" --sample_n=8 --sample_unjudged=written")  # PAIRS_ARGS, last
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


# ----------------------------------------------------------------------------- the real scripts, at the tiny size
STEPS = ["--log_interval=1", "--eval_interval=2", "--ckpt_interval=2", "--eval_iters=1"]  # a checkpoint every 2 steps


def tiny_reference(tmp_path, stop_at=None, **extra_env):
    """`SIZE=tiny bash reference.sh` with a few steps per stage, every folder in tmp_path; stop_at: a line of its
    output at which it is stopped as Ctrl-C in its terminal stops it (SIGINT to its process group). Returns (exit
    status, output)."""
    env = dict(os.environ, SIZE="tiny", RUN=str(tmp_path / "ref"), DATA=str(tmp_path / "data"), PYTHONUNBUFFERED="1")
    env.update(SFT_DATA=str(tmp_path / "sft_data"), DPO_DATA=str(tmp_path / "dpo_data"))
    env.update(PREPARE="--vocab_size=512 --tokenizer_docs=300")  # a smaller tokenizer, trained sooner
    env.update(SFT_ARGS=" ".join([*STEPS, "--max_iters=4", "--num_samples=0", "--max_new_tokens=8"]))
    env.update(DPO_ARGS=" ".join([*STEPS, "--max_iters=5"]))
    env.update(EVAL_ARGS="--problems=2 --samples=0 --chat_questions=4 --bpb_tokens=4096 --max_new_tokens=16")
    env.update(extra_env)
    proc = subprocess.Popen(
        ["bash", str(REPO / "reference.sh"), *STEPS, "--max_iters=6"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        # Ctrl-C's signal as a terminal delivers it: a test run in the background (CI's may be) inherits SIGINT ignored,
        # and a non-interactive bash cannot undo that, so the stops below would stop nothing
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    lines, watchdog = [], threading.Timer(400, os.killpg, (proc.pid, signal.SIGKILL))  # a hang fails, not hangs
    watchdog.start()
    for line in proc.stdout:
        lines.append(line)
        if stop_at and line.startswith(stop_at):
            os.killpg(proc.pid, signal.SIGINT)
            stop_at = None
    watchdog.cancel()
    return proc.wait(timeout=60), "".join(lines)


def processes_naming(path):
    """The command lines of running processes that name path (Linux's /proc)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        if cmdline.parent.name == str(os.getpid()):
            continue
        try:
            args = cmdline.read_bytes().decode(errors="replace").split("\0")
        except OSError:  # it ended meanwhile
            continue
        if any(str(path) in arg for arg in args):
            found.append(" ".join(args))
    return found


def test_the_tiny_pipeline_ends_in_a_card_after_a_stop_in_each_training_stage(tmp_path):
    """The real scripts, stopped as Ctrl-C stops them in pretraining, SFT and DPO (each after its step 3, a checkpoint
    at step 2), then run again: each run goes on from where the last one stopped, never from the start of a finished
    or stopped stage, no background stage outlives a stop, and the last run ends in a card of the three runs."""
    stops = ["step 3/6 |", "step 3/4 |", "step 3/5 |"]  # pretraining, SFT, DPO
    outputs = []
    for stop in stops:
        status, out = tiny_reference(tmp_path, stop)
        outputs.append(out)
        assert status != 0 and stop in out and not (tmp_path / "ref_card" / "card.md").exists(), out[-2000:]
        leftover = processes_naming(tmp_path / "ref")
        assert not leftover, f"a stage outlived the stop: {leftover}"
    status, out = tiny_reference(tmp_path)
    outputs.append(out)
    assert status == 0, out[-3000:]
    # each run began its stage where the last one stopped: the stopped stage again from its step-2 checkpoint
    for run_out, steps in zip(outputs[1:], ["/6 |", "/4 |", "/5 |"], strict=True):
        assert f"step 3{steps}" in run_out and f"step 1{steps}" not in run_out, run_out[-3000:]
    assert "step 1/6 |" not in "".join(outputs[1:]) and "step 1/4 |" not in "".join(outputs[2:])
    card = (tmp_path / "ref_card" / "card.md").read_text()
    assert all(name in card for name in ("ref", "ref_sft", "ref_dpo")) and "HumanEval" in card, card
    stages = [line.split("\t")[0] for line in (tmp_path / "ref_card" / "stages.tsv").read_text().splitlines()]
    assert {"prepare corpus", "pretrain", "sft", "dpo", "eval ref", "eval ref_sft", "eval ref_dpo"} <= set(stages)
    # then DPO on the SFT run's own answers: only its stages run, from the same SFT model, into folders of their own
    status, out = tiny_reference(tmp_path, DPO_PAIRS="sampled", DPO_DATA=str(tmp_path / "dpo_sampled"))
    assert status == 0 and "step 1/6 |" not in out and "step 1/4 |" not in out and "step 5/5 |" in out, out[-3000:]
    manifest = json.loads((tmp_path / "dpo_sampled" / "manifest.json").read_text())
    assert "answers of " + str(tmp_path / "ref_sft") in manifest["source"], manifest["source"]
    card = (tmp_path / "ref_sampled_card" / "card.md").read_text()
    assert "ref_dpo_sampled" in card and (tmp_path / "ref_card" / "card.md").read_text() != card
