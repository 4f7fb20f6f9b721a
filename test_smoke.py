"""The whole pipeline in tiny form, run as a user runs it: prepare -> train -> sample -> SFT -> DPO -> chat ->
report card, as subprocesses.

prepare.py builds the default corpus (this Python's standard library, no download) into a temporary folder.
"""

import importlib.util
import json
import math
import os
import sys
import sysconfig
import zlib
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent / "tests"))
from conftest import TINY, run  # noqa: E402

import quality  # noqa: E402  (the repo's modules: conftest has put the repo on sys.path)
from shards import find_shards, open_shard  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402


def corpus_counts(val_permille):
    """What the standard-library corpus implies for prepare.py's manifest, counted here from the files themselves:
    rows (every .py file outside site-packages), empty (no text, or not UTF-8), val (the files whose name sends them
    to validation), and for each training file the first code rule it fails, or "passed"; the near-duplicate pass
    runs on those that passed, and what it leaves out shows in the shards."""
    root = Path(sysconfig.get_paths()["stdlib"])
    counts = Counter()
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = [f for f in subfolders if f not in ("site-packages", "dist-packages")]  # not the stdlib's
        for path in (Path(folder, f) for f in files if f.endswith(".py")):
            counts["rows"] += 1
            try:
                text = path.read_bytes().decode("utf-8")
            except UnicodeDecodeError:
                text = ""
            if not text:
                counts["empty"] += 1
            elif zlib.crc32(path.relative_to(root).as_posix().encode()) % 1000 < val_permille:
                counts["val"] += 1
            else:
                counts[quality.failed_rule(text, quality.CODE_RULES) or "passed"] += 1
    return counts


def split_tokens(folder, split):
    return np.concatenate([np.asarray(open_shard(path)) for path in find_shards(folder, split)])


def split_sizes(folder):
    manifest = json.loads((folder / "manifest.json").read_text())
    return {s: sum(sh["tokens"] for sh in manifest["shards"] if sh["split"] == s) for s in ("train", "val")}


def metrics(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def check_prepared(data, tok):
    """Every file of the corpus accounted for once: the rule counts are the rules applied to the training files, and
    the documents in the shards are the files that passed, less the near-copies the manifest says it left out."""
    manifest = json.loads((data / "manifest.json").read_text())
    docs, implied = manifest["docs"], corpus_counts(manifest["settings"]["val_permille"])
    assert (docs["rows"], docs["empty"], docs["filtered"]) == (implied["rows"], implied["empty"], 0), (docs, implied)
    assert {rule: docs.get(rule, 0) for rule in quality.CODE_RULES} == {r: implied[r] for r in quality.CODE_RULES}
    in_shards = {s: np.count_nonzero(split_tokens(data, s) == tok.bos_id) for s in ("train", "val")}
    assert in_shards["val"] == implied["val"] == docs["near_dup_val_docs"], (in_shards, docs, implied)
    assert in_shards["train"] == implied["passed"] - docs["near_dup"] and docs["near_dup"] > 0, (in_shards, docs)
    assert docs["kept"] == sum(in_shards.values())


def frequent_share(samples, tok, data):
    """The share of the samples' tokens (the prompt "def" left out) that are among the most frequent tokens of the
    training split, those that make up half of it (51 of 1024 here): an untrained model, drawing about uniformly,
    gives ~5%."""
    counts = np.bincount(split_tokens(data, "train"), minlength=tok.vocab_size)
    order = np.argsort(-counts)
    head = set(order[: np.searchsorted(np.cumsum(counts[order]), counts.sum() / 2) + 1].tolist())
    new = [i for s in samples for i in tok.encode(s.strip().removeprefix("def"))]
    assert len(new) >= 20, samples
    return sum(i in head for i in new) / len(new)


def test_prepare_train_sample_sft_dpo_chat(tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    # the tokenizer from the first 400 files, not all ~1,700: its training was 15 of prepare.py's 25 s here
    proc = run("prepare.py", f"--data_dir={data}", "--vocab_size=1024", "--tokenizer_docs=400")
    assert "standard library" in proc.stdout and "done:" in proc.stdout
    tokens, tok = split_sizes(data), load_tokenizer(data / "tokenizer.model")
    assert tokens["train"] > 1_000_000 and tokens["val"] > 100_000
    check_prepared(data, tok)

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
    records = metrics(out)
    base = {r["step"]: r["val_loss"] for r in records if "val_loss" in r}
    assert abs(base[0] - 6.93) < 0.3  # ln(1024) at init
    assert base[60] < base[0] - 1.5, base  # it learned something
    assert all({"loss", "tok_per_s", "mem_gib"} <= set(r) for r in records if "loss" in r)
    if importlib.util.find_spec("tensorboard"):  # optional dependency (in the test extra)
        assert list((out / "tb").iterdir()), "TensorBoard event files"

    proc = run("sample.py", f"--out_dir={out}", "--start=def ", "--max_new_tokens=30", "--num_samples=2")
    samples = proc.stdout.split("-" * 80)
    assert len(samples) == 3 and all(s.strip().startswith("def") for s in samples[:2])
    assert frequent_share(samples[:2], tok, data) > 0.25, samples  # sampled from what the model learned (55-84%)

    # SFT on the demo conversations, DPO on the demo pairs, then a chat answer from the DPO model
    sft_data, dpo_data, sft, dpo = tmp_path / "sft_data", tmp_path / "dpo_data", tmp_path / "sft", tmp_path / "dpo"
    tokenizer = f"--tokenizer={out / 'tokenizer.model'}"
    run("prepare.py", "--mode=sft", f"--data_dir={sft_data}", tokenizer, "--block_size=64")
    common = ["--device=cpu", "--batch_size=8", "--log_interval=5", "--warmup_iters=2"]
    run(
        "sft.py",
        f"--init_from={out}",
        f"--data_dir={sft_data}",
        f"--out_dir={sft}",
        *common,
        "--max_iters=60",
        "--eval_interval=60",
        "--eval_iters=1",
        "--lr_frac=1.0",  # the base run's rates: at sft.py's 0.05, 20 steps never ended a turn
        "--max_new_tokens=32",
        "--num_samples=1",
    )
    records = metrics(sft)
    val = {r["step"]: r for r in records if "val_loss" in r}
    assert val[60]["val_loss"] < val[0]["val_loss"] - 1.0, val  # the chat val set, where step 0 is the base model
    assert val[60]["pretrain_val_loss"] < val[0]["pretrain_val_loss"] + 0.5, val  # replay held the base's text
    assert records[-1]["eot_rate"] >= 0.2, records[-1]  # greedy answers end their turn (0.41-0.93 measured; 0 before)
    proc = run("prepare.py", "--mode=dpo", f"--data_dir={dpo_data}", tokenizer, "--block_size=64")
    assert "pairs kept of" in proc.stdout
    proc = run(
        "dpo.py",
        f"--init_from={sft}",
        f"--data_dir={dpo_data}",
        f"--out_dir={dpo}",
        *common,
        "--max_iters=20",
        "--eval_interval=20",
        "--eval_iters=4",  # all 32 held-out pairs
        "--lr_frac=0.2",  # at config/dpo_tiny_cpu.py's 0.5 this small model's answers stopped ending their turn
        "--precompute_ref=true",
    )
    assert "held-out preference accuracy" in proc.stdout
    records = metrics(dpo)
    val = [r for r in records if "val_loss" in r]
    assert abs(val[0]["val_loss"] - math.log(2) - 0.2 * val[0]["val_nll"]) < 1e-5  # DPO's ln 2 + RPO's term
    # on pairs it never trained on, the chosen answers gained on the rejected ones against the SFT reference (step 0:
    # exactly 0; 0.049-0.067 measured over three seeds), and the rejected ones fell below it: the NLL term alone
    # raises them too (+0.60), as each rejected answer is another held-out question's chosen one. The held-out
    # preference itself stays near the SFT model's 50% at this size, where the model barely reads the question.
    assert val[-1]["step"] == 20 and val[-1]["val_rewards/margins"] > 0.02, val
    assert val[-1]["val_rewards/rejected"] < -0.05, val  # -0.16 to -0.39 measured
    assert all(
        {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"} <= set(r)
        for r in records
        if "loss" in r
    )
    # the report card of the DPO model, as the Quick start ends: every task, followed back to the pretraining data
    args = ["--problems=4", "--samples=2", "--pass_k=1", "--bpb_tokens=16384"]  # bits per byte: 256 rows, not 1024
    # answers of 32 tokens: generation keeps a prompt's last block_size - max_new tokens, and at block_size 64 the
    # config's 128 would leave each question its <|assistant|> token alone
    args.append("--chat_max_new_tokens=32")
    proc = run("eval.py", "config/eval_tiny_cpu.py", f"--out_dir={dpo}", *args)
    report = json.loads((dpo / "report.json").read_text())
    assert report["kind"] == "dpo" and report["bpb"]["data_dir"] == str(data)
    bpb = report["bpb"]
    assert bpb["tokens"] == 16384 and 0.3 < bpb["bits_per_byte"] < 4 and bpb["loss"] < base[0]  # it learned
    held_out = split_tokens(data, "val")[: 256 * 65]  # its 256 rows of block_size + 1
    bytes_per_token = len(tok.decode(held_out.tolist()).encode()) / len(held_out)  # bits per byte is nats / ln 2 / this
    assert abs(bpb["bits_per_byte"] * math.log(2) * bytes_per_token / bpb["loss"] - 1) < 0.01, bpb  # 0.9993
    scanned = tokens["train"] + split_sizes(sft_data)["train"] + split_sizes(dpo_data)["train"]
    assert report["humaneval"]["problems"] == 4 and report["contamination"]["tokens_scanned"] == scanned
    questions = np.count_nonzero(split_tokens(sft_data, "val") == tok.bos_id)
    assert report["chat"]["questions"] == min(32, questions) and {"rouge_l", "loop_rate"} <= set(report["chat"])
    assert report["chat"]["end_of_turn_rate"] >= 0.3, report["chat"]  # 0.59-0.89 measured; 0 from a broken SFT
    dpo_end = records[-1]  # dpo.py's preference over every held-out pair, policy and reference: the same here
    assert abs(report["dpo"]["policy"] - dpo_end["all_val_prefers_chosen"]) < 1e-6, (report["dpo"], dpo_end)
    assert abs(report["dpo"]["reference"] - dpo_end["all_ref_prefers_chosen"]) < 1e-6, (report["dpo"], dpo_end)
    assert (dpo / "curves.png").stat().st_size > 10_000
    assert len((dpo / "humaneval_samples.jsonl").read_text().splitlines()) == 4 * 2
    assert proc.stdout.rstrip().endswith("|") and "| bits per byte, held-out pretraining data |" in proc.stdout
    assert report["humaneval"]["format"] == "chat" and 0.3 < report["humaneval"]["canonical_bpb"] < 8  # asked as chat

    # a chat answer as a user gets one: sample.py's own chat template and decoding give, greedily, the answer that
    # eval.py's batched, left-padded decoding gave to the same held-out question
    example = report["chat"]["examples"][0]
    args = ["--chat", f"--start={example['question']}", "--temperature=0", "--max_new_tokens=32"]
    answer = run("sample.py", f"--out_dir={dpo}", *args).stdout
    assert answer.strip() == example["answer"].strip() and answer.strip(), (answer, example)
