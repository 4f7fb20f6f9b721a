"""The whole pipeline in tiny form, run as a user runs it: prepare -> train -> sample -> SFT -> DPO -> chat ->
report card, as subprocesses.

prepare.py builds the default corpus (this Python's standard library, no download) into a temporary folder.
"""

import importlib.util
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "tests"))
from conftest import TINY, run  # noqa: E402


def test_prepare_train_sample_sft_dpo_chat(tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    proc = run("prepare.py", f"--data_dir={data}", "--vocab_size=1024")
    assert "standard library" in proc.stdout and "done:" in proc.stdout
    manifest = json.loads((data / "manifest.json").read_text())
    tokens = {s: sum(sh["tokens"] for sh in manifest["shards"] if sh["split"] == s) for s in ("train", "val")}
    assert manifest["complete"] and tokens["train"] > 1_000_000 and tokens["val"] > 100_000

    run(
        "train.py",
        "config/tiny_cpu.py",
        f"--data_dir={data}",
        f"--out_dir={out}",
        *TINY,
        "--max_iters=60",
        "--eval_interval=60",
        "--ckpt_interval=60",
        "--n_embd=128",
        "--mlp_hidden=384",
        "--learning_rate=0.01",
    )
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val = {r["step"]: r["val_loss"] for r in records if "val_loss" in r}
    assert abs(val[0] - 6.93) < 0.3  # ln(1024) at init
    assert val[60] < val[0] - 1.5, val  # it learned something
    assert all({"loss", "tok_per_s", "mem_gib"} <= set(r) for r in records if "loss" in r)
    if importlib.util.find_spec("tensorboard"):  # optional dependency (in the test extra)
        assert list((out / "tb").iterdir()), "TensorBoard event files"

    proc = run("sample.py", f"--out_dir={out}", "--start=def ", "--max_new_tokens=30", "--num_samples=2")
    samples = proc.stdout.split("-" * 80)
    assert len(samples) == 3 and all(s.strip().startswith("def") for s in samples[:2])
    assert len(samples[0].strip()) > 30  # text came out after the prompt

    # SFT on the demo conversations, DPO on the demo pairs, then a chat answer from the DPO model
    sft_data, dpo_data, sft, dpo = tmp_path / "sft_data", tmp_path / "dpo_data", tmp_path / "sft", tmp_path / "dpo"
    tokenizer = f"--tokenizer={out / 'tokenizer.model'}"
    run("prepare.py", "--mode=sft", f"--data_dir={sft_data}", tokenizer, "--block_size=64")
    common = ["--device=cpu", "--batch_size=8", "--eval_iters=1", "--log_interval=5", "--warmup_iters=2"]
    run(
        "sft.py",
        f"--init_from={out}",
        f"--data_dir={sft_data}",
        f"--out_dir={sft}",
        *common,
        "--max_iters=20",
        "--eval_interval=20",
        "--max_new_tokens=4",
        "--num_samples=1",
    )
    proc = run("prepare.py", "--mode=dpo", f"--data_dir={dpo_data}", tokenizer, "--block_size=64")
    assert "pairs kept of" in proc.stdout
    proc = run(
        "dpo.py",
        f"--init_from={sft}",
        f"--data_dir={dpo_data}",
        f"--out_dir={dpo}",
        *common,
        "--max_iters=10",
        "--eval_interval=10",
        "--precompute_ref=true",
    )
    assert "held-out preference accuracy" in proc.stdout
    records = [json.loads(line) for line in (dpo / "metrics.jsonl").read_text().splitlines()]
    assert abs(records[0]["val_loss"] - math.log(2) - 0.2 * records[0]["val_nll"]) < 1e-5  # DPO's ln 2 + RPO's term
    assert all(
        {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"} <= set(r)
        for r in records
        if "loss" in r
    )
    answer = run("sample.py", f"--out_dir={dpo}", "--chat", "--start=What does json.dumps do?", "--max_new_tokens=8")
    assert answer.stdout.strip()

    # the report card of the DPO model, as the Quick start ends: every task, followed back to the pretraining data
    proc = run("eval.py", "config/eval_tiny_cpu.py", f"--out_dir={dpo}", "--problems=4", "--samples=2", "--pass_k=1")
    report = json.loads((dpo / "report.json").read_text())
    assert report["kind"] == "dpo" and report["bpb"]["data_dir"] == str(data)
    assert 0.3 < report["bpb"]["bits_per_byte"] < 4 and report["bpb"]["loss"] < val[0]  # it learned; measured
    assert (
        report["humaneval"]["problems"] == 4 and report["contamination"]["tokens_scanned"] > tokens["train"]
    )  # + SFT, DPO data
    assert report["chat"]["questions"] > 0 and 0 <= report["chat"]["rouge_l"] <= 1
    assert 0 <= report["dpo"]["policy"] <= 1 and (dpo / "curves.png").stat().st_size > 10_000
    assert len((dpo / "humaneval_samples.jsonl").read_text().splitlines()) == 4 * 2
    assert proc.stdout.rstrip().endswith("|") and "| bits per byte, held-out pretraining data |" in proc.stdout
    assert report["humaneval"]["format"] == "chat" and 0.3 < report["humaneval"]["canonical_bpb"] < 8  # asked as chat
    assert 0 <= report["chat"]["loop_rate"] <= 1
