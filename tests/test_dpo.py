"""DPO: prepare.py --mode=dpo on both record schemas and bad input, and dpo.py: the loss against an independent
computation, ln 2 at the start, chosen rewards rising, a reference that never changes, precomputed reference
log-probabilities, tokenizer mismatch, resume."""

import hashlib
import json
import math

import torch
import torch.nn.functional as F
from conftest import assert_memory_fields, patched, run
from test_train import assert_one_line_error

import chat
import checkpoints
from shards import open_pairs
from tokenizer import Tokenizer

STATS = ["loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "nll"]


def dpo(sft, data, out, *args, check=True, **seams):
    """dpo.py run as a user would; through tests/patched.py with seams (FAKE_OOM=..., ...) when given."""
    return (patched if seams else run)(
        "dpo.py",
        f"--init_from={sft}",
        f"--data_dir={data}",
        f"--out_dir={out}",
        "--device=cpu",
        "--batch_size=8",
        "--eval_iters=2",
        "--log_interval=1",
        "--warmup_iters=2",
        "--lr_frac=0.5",
        *args,
        check=check,
        **seams,
    )


def records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def read_pairs(data, tok, splits=("train", "val")):
    """The pairs of the splits as (prompt, chosen, rejected) token lists."""
    pairs = []
    for split in splits:
        tokens, lengths = open_pairs(data, split, tok.vocab_size)
        a = 0
        for p, c, r in lengths.tolist():
            pairs.append(
                (
                    tokens[a : a + p].tolist(),
                    tokens[a + p : a + p + c].tolist(),
                    tokens[a + p + c : a + p + c + r].tolist(),
                )
            )
            a += p + c + r
    return pairs


def test_prepare_dpo_reads_both_schemas_cuts_and_counts(tiny_data, tmp_path):
    tok = Tokenizer(str(tiny_data / "tokenizer.model"))
    triples = [(f"What is {i} + {i}?", f"It is {2 * i}.", f"It is {2 * i + 1}.") for i in range(40)]
    triples[5] = ("Same?", "Yes.", "Yes.")  # identical completions: skipped, counted
    triples[7] = ("word " * 100, "short.", "shorter.")  # the prompt gives way
    triples[9] = ("Long answers?", "x " * 200, "y " * 200)  # the completions are cut too
    plain = [{"prompt": q, "chosen": c, "rejected": r} for q, c, r in triples]
    ultrafeedback = [
        {
            "prompt": q,
            "prompt_id": str(i),
            "chosen": [{"role": "user", "content": q}, {"role": "assistant", "content": c}],
            "rejected": [{"role": "user", "content": q}, {"role": "assistant", "content": r}],
            "score_chosen": 8.0,
            "score_rejected": 3.0,
        }
        for i, (q, c, r) in enumerate(triples)
    ]
    (tmp_path / "uf.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ultrafeedback))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(plain), tmp_path / "plain.parquet")
    common = [f"--tokenizer={tiny_data / 'tokenizer.model'}", "--block_size=64", "--val_permille=200"]
    for name in ("uf.jsonl", "plain.parquet"):
        proc = run("prepare.py", "--mode=dpo", f"--input={tmp_path / name}", f"--data_dir={tmp_path / name}.d", *common)
        assert "skipped 1 with identical completions, truncated 2 longer than block_size=64" in proc.stdout
    a, b = tmp_path / "uf.jsonl.d", tmp_path / "plain.parquet.d"
    for f in ("train_000000.bin", "val_000000.bin", "train.pairs", "val.pairs"):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    assert json.loads((a / "manifest.json").read_text())["docs"] == {
        "pairs": 40,
        "kept": 39,
        "identical": 1,
        "truncated": 2,
    }
    pairs = read_pairs(a, tok)
    end, assistant = tok.special[chat.END], tok.special["<|assistant|>"]
    by_question = {}
    for p, c, r in pairs:
        assert p[0] == tok.bos_id and p[-1] == assistant and len(p) + max(len(c), len(r)) <= 64
        by_question[tok.decode(p)] = (tok.decode(c), tok.decode(r), p, c, r)
    assert by_question["What is 3 + 3?"][:2] == ("It is 6.", "It is 7.")
    assert by_question["What is 3 + 3?"][3][-1] == end  # a completion ends with <|end|>
    assert "Same?" not in by_question
    # a long prompt keeps its first token and its end, the completions stay whole, and the pair fills the block
    question, (chosen, rejected, p, c, r) = next((k, v) for k, v in by_question.items() if "word word" in k)
    assert (chosen, rejected) == ("short.", "shorter.") and len(p) + len(r) == 64
    assert len(chat.render_prompt(tok, [{"role": "user", "content": triples[7][0]}])) > len(p)
    # completions longer than the block: the prompt stays (it is under half the block), completions keep their start
    chosen, rejected, p, c, r = by_question["Long answers?"]
    assert len(c) == len(r) == 64 - len(p) and chosen.startswith("x x x") and c[-1] != end

    # a record missing a field: one line naming it, and the folder prepared before is left as it was
    before = {f.name: f.read_bytes() for f in a.iterdir()}
    bad = plain[:3] + [{"prompt": "q", "chosen": "a"}]
    (tmp_path / "bad.jsonl").write_text("".join(json.dumps(r) + "\n" for r in bad))
    proc = run(
        "prepare.py",
        "--mode=dpo",
        f"--input={tmp_path / 'bad.jsonl'}",
        f"--data_dir={a}",
        *common,
        "--overwrite=true",
        check=False,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: pair 3: no 'rejected' field") and len(proc.stderr.splitlines()) == 1
    assert {f.name: f.read_bytes() for f in a.iterdir()} == before


def logp(model, prompt, completion):
    """The summed log-probability of completion after prompt, in float64 from full logits: no padding, no batching."""
    seq = torch.tensor([prompt + completion])
    logits = model.logits(seq[:, :-1]).double()  # (1, T, V)
    logprobs = F.log_softmax(logits, dim=-1)[0, len(prompt) - 1 :]  # the positions that predict the completion
    return logprobs.gather(1, torch.tensor(completion)[:, None]).sum().item()


def chosen_nll(model, pairs, batch_size):
    """The chosen completions' NLL per token as dpo.py's evaluation weighs it: per token within each batch of
    batch_size consecutive pairs, then the batches' mean weighted by their number of pairs."""
    batches = [pairs[i : i + batch_size] for i in range(0, len(pairs), batch_size)]
    per_batch = [-sum(logp(model, p, c) for p, c, _ in b) / sum(len(c) for _, c, _ in b) for b in batches]
    return sum(len(b) * nll for b, nll in zip(batches, per_batch, strict=True)) / len(pairs)


def reference_loss(policy, reference, pairs, beta):
    """The DPO loss and mean rewards, computed pair by pair in float64 from full logits: no padding, no batching."""
    losses, chosen_rewards, rejected_rewards = [], [], []
    for p, c, r in pairs:
        chosen = beta * (logp(policy, p, c) - logp(reference, p, c))
        rejected = beta * (logp(policy, p, r) - logp(reference, p, r))
        losses.append(-math.log(1 / (1 + math.exp(-(chosen - rejected)))))
        chosen_rewards.append(chosen)
        rejected_rewards.append(rejected)
    n = len(pairs)
    return sum(losses) / n, sum(chosen_rewards) / n, sum(rejected_rewards) / n


def load(path):
    ckpt = checkpoints.load_checkpoint(path)
    return checkpoints.build_model(ckpt, path).eval(), ckpt


def test_dpo_loss_rewards_and_frozen_reference(sft_run, tmp_path):
    sft, _ = sft_run
    # pairs with a signal 24 steps can learn, the right answer over its first two words: this test is about DPO's
    # mechanics, and the demo's pairs (another function's answer) need more than 24 steps of a 20-step model
    rows = [
        {"prompt": q["content"], "chosen": a["content"], "rejected": " ".join(a["content"].split(" ")[:2])}
        for q, a in chat.stdlib_conversations()
        if len(a["content"].split(" ")) >= 4
    ]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data, tokenizer = tmp_path / "pairs", f"--tokenizer={sft / 'tokenizer.model'}"
    run(
        "prepare.py",
        "--mode=dpo",
        f"--input={tmp_path / 'pairs.jsonl'}",
        f"--data_dir={data}",
        tokenizer,
        "--block_size=64",
    )
    sft_ckpt = sft / checkpoints.BEST
    sft_bytes = hashlib.sha256(sft_ckpt.read_bytes()).hexdigest()
    out = tmp_path / "dpo"
    args = ["--max_iters=24", "--eval_interval=24", "--batch_size=16", "--lr_frac=0.15", "--nll_weight=0.5"]
    proc = dpo(sft, data, out, *args)
    log = records(out)
    first_eval, last_eval = [r for r in log if "val_loss" in r][0], [r for r in log if "val_loss" in r][-1]
    steps = [r for r in log if "loss" in r]
    # at the start the policy is the reference: DPO's loss ln 2, rewards 0; plus half the chosen answers' NLL
    assert abs(first_eval["val_loss"] - math.log(2) - 0.5 * first_eval["val_nll"]) < 1e-5
    assert abs(steps[0]["loss"] - math.log(2) - 0.5 * steps[0]["nll"]) < 1e-5 and steps[0]["nll"] > 1
    for r in (first_eval, steps[0]):
        assert all(abs(r[k]) < 1e-6 for k in r if "rewards/" in k and "accuracies" not in k)
    # on the training pairs, chosen rewards rise relative to rejected ones
    late = steps[-8:]
    assert sum(r["rewards/margins"] for r in late) / 8 > 0.05, late
    assert sum(r["rewards/chosen"] - r["rewards/rejected"] for r in late) / 8 > 0.05
    assert sum(r["rewards/accuracies"] for r in late) / 8 > 0.55
    assert "held-out preference accuracy" in proc.stdout

    # the logged held-out loss equals an independent computation with the SFT weights as the reference: DPO's loss
    # plus nll_weight x the chosen answers' NLL per token, per batch of 16 pairs (each batch weighs its pairs)
    policy, _ = load(out / "ckpt_0000024.safetensors")
    reference, ref_ckpt = load(sft_ckpt)
    tok = Tokenizer(str(out / "tokenizer.model"))
    pairs = read_pairs(data, tok, ["val"])[: 2 * 16]  # eval_iters x batch_size; all fit the model's 64 tokens
    with torch.no_grad():
        loss, chosen, rejected = reference_loss(policy, reference, pairs, beta=0.1)
    assert abs(loss + 0.5 * last_eval["val_nll"] - last_eval["val_loss"]) < 1e-5 and abs(loss - math.log(2)) > 1e-3
    with torch.no_grad():
        assert abs(chosen_nll(policy, pairs, 16) - last_eval["val_nll"]) < 1e-5, len(pairs)
    assert abs(chosen - last_eval["val_rewards/chosen"]) < 1e-5
    assert abs(rejected - last_eval["val_rewards/rejected"]) < 1e-5

    # the reference never changed: the SFT checkpoint is untouched and ref.safetensors holds its weights, bit for bit
    assert hashlib.sha256(sft_ckpt.read_bytes()).hexdigest() == sft_bytes
    ref = checkpoints.load_checkpoint(out / "ref.safetensors")["model"]
    assert ref.keys() == ref_ckpt["model"].keys()
    assert all(torch.equal(ref[k], ref_ckpt["model"][k]) for k in ref)

    # precomputed reference log-probabilities give the same run
    proc = dpo(sft, data, tmp_path / "pre", *args, "--precompute_ref=true")
    assert "reference log-probabilities of" in proc.stdout
    for live, pre in zip(log, records(tmp_path / "pre"), strict=True):
        for k in live:
            if k in STATS or k.startswith("val_") or k.startswith("ref_"):
                assert abs(live[k] - pre[k]) < 1e-5, (k, live, pre)


def test_dpo_refuses_data_of_another_tokenizer(sft_run, tmp_path):
    sft, data = sft_run
    out = tmp_path / "dpo"
    dpo(sft, data, out, "--max_iters=2", "--eval_interval=2")
    before = {f.name: f.read_bytes() for f in out.iterdir() if f.is_file()}
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("def other(tokenizer):\n    return 'different text'\n" * 200)
    run("prepare.py", f"--input={src}", f"--data_dir={tmp_path / 'other'}", "--vocab_size=300", "--val_permille=0")
    other = tmp_path / "other_dpo"
    run("prepare.py", "--mode=dpo", f"--data_dir={other}", f"--tokenizer={tmp_path / 'other' / 'tokenizer.model'}")
    proc = dpo(sft, other, out, "--max_iters=2", "--overwrite=true", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) == 1
    assert proc.stderr.startswith(f"error: {other} was made with another tokenizer")
    assert str(other / "tokenizer.model") in proc.stderr and str(sft / "tokenizer.model") in proc.stderr
    assert {f.name: f.read_bytes() for f in out.iterdir() if f.is_file()} == before


def test_dpo_resume_matches_uninterrupted(sft_run, tmp_path):
    """A run stopped at step 3 and resumed logs the losses of one that never stopped. That one has batch_size=auto
    (out of memory faked above 600 tokens: 8 pairs of up to 64 do not fit, 4 do, the stopped run's setting) and
    patience=1 with the held-out loss forced up after step 3: it stops at step 6 of 9, ckpt_best at step 3."""
    sft, data = sft_run
    common = ["--lr_decay_iters=6", "--ckpt_interval=3", "--eval_interval=3", "--eval_iters=1", "--patience=1"]
    common += ["--global_batch_size=8"]
    full, split, seams = tmp_path / "full", tmp_path / "split", dict(FAKE_OOM=600, FORCE_VAL="3:1.0")
    proc = dpo(sft, data, full, *common, "--max_iters=9", "--batch_size=auto", **seams)
    assert "batch_size=auto: 4 (8 ran out of memory) -> gradient_accumulation_steps=2" in proc.stdout
    assert "early stop at step 6" in proc.stdout and "held-out preference accuracy" in proc.stdout
    assert checkpoints.load_checkpoint(full / checkpoints.BEST)["iter_num"] == 3
    assert records(full)[-2]["early_stop"] and records(full)[-2]["best_step"] == 3
    dpo(sft, data, split, *common, "--max_iters=3", "--batch_size=4", **seams)
    proc = dpo("resume", data, split, *common, "--max_iters=6", "--optimizer=adamw", check=False)
    assert_one_line_error(proc, "trained with optimizer=muon", "says optimizer=adamw")
    dpo("resume", data, split, *common, "--max_iters=6", "--batch_size=auto", **seams)  # the checkpoint's 4

    def losses(out):
        return {r["step"]: r["loss"] for r in records(out) if "loss" in r}

    assert list(losses(full)) == [1, 2, 3, 4, 5, 6]
    assert losses(full) == losses(split)
    assert_memory_fields(records(full))
