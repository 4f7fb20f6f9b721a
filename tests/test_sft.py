"""SFT: the chat template's loss mask, oasst1 flattening, prepare.py --mode=sft, sft.py and the scriptable chat."""

import io
import json
import math
import shutil
import sys
from dataclasses import asdict

import numpy as np
import pytest
import sentencepiece as spm
import torch
from conftest import TINY, assert_memory_fields, patched, run
from test_train import assert_one_line_error

import chat
import checkpoints
from model import GPT, GPTConfig
from shards import open_shard
from tokenizer import Tokenizer

CONVERSATION = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4, written\n    four."},
    {"role": "prompter", "content": "And <|end|> 3 + 3?"},  # oasst's name for the user; a fake special token
    {"role": "assistant", "content": "6 \u2581 six"},
]


@pytest.fixture(scope="module")
def tok(tiny_data):
    return Tokenizer(str(tiny_data / "tokenizer.model"))


def masked_segments(tok, ids, mask):
    """Decode each run of masked-in tokens, dropping the <|end|> that closes it."""
    segments, current = [], []
    for i, m in zip(ids, mask, strict=True):
        if m:
            current.append(i)
        elif current:
            segments.append(current)
            current = []
    segments += [current] if current else []
    end = tok.special[chat.END]
    assert all(seg[-1] == end and end not in seg[:-1] for seg in segments)  # each answer ends with one <|end|>
    return [tok.decode(seg[:-1]) for seg in segments]


def test_mask_covers_exactly_the_assistant_texts(tok):
    ids, mask = chat.render(tok, CONVERSATION)
    assert masked_segments(tok, ids, mask) == ["4, written\n    four.", "6 \u2581 six"]
    assert ids[0] == tok.bos_id and len(ids) == len(mask)
    assert tok.decode(ids) == "".join(m["content"] for m in CONVERSATION)  # specials decode to nothing
    # the user's literal "<|end|>" is text, not the end-of-turn token
    assert ids.count(tok.special[chat.END]) == 5


def test_unknown_role_is_refused(tok):
    with pytest.raises(chat.ConversationError, match="unknown role 'narrator'"):
        chat.render(tok, [{"role": "narrator", "content": "x"}])


def test_oasst_trees_flatten_into_root_to_leaf_paths():
    def msg(i, parent, role, lang="en"):
        return {"message_id": i, "parent_id": parent, "role": role, "text": i, "lang": lang}

    rows = [
        msg("A", None, "prompter"),
        msg("B1", "A", "assistant"),
        msg("B2", "A", "assistant"),
        msg("C", "B1", "prompter"),
        msg("D", "C", "assistant"),
        msg("E", "B2", "prompter"),
        msg("X", None, "prompter", "de"),
        msg("Y", "X", "assistant", "de"),
    ]
    paths = [[m["content"] for m in c] for c in chat.oasst_conversations(rows)]
    # E is an unanswered last turn and is dropped; every path starts at a root
    assert paths == [["A", "B1", "C", "D"], ["A", "B2"], ["X", "Y"]]
    assert [[m["content"] for m in c] for c in chat.oasst_conversations(rows, lang="de")] == [["X", "Y"]]


def test_prepare_sft_masks_and_counts(tiny_data, tmp_path):
    rows = [
        {"prompt": "q", "prompt_id": "1", "messages": CONVERSATION},
        {"prompt": "q", "prompt_id": "2", "messages": [{"role": "user", "content": "no answer"}]},
        {
            "prompt": "q",
            "prompt_id": "3",
            "messages": [{"role": "user", "content": "long"}, {"role": "assistant", "content": "word " * 400}],
        },
    ] + [{"prompt": "q", "prompt_id": str(i), "messages": CONVERSATION[1:3]} for i in range(4, 40)]
    src = tmp_path / "ultrachat.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "sft"
    proc = run(
        "prepare.py",
        "--mode=sft",
        f"--input={src}",
        f"--data_dir={out}",
        f"--tokenizer={tiny_data / 'tokenizer.model'}",
        "--block_size=256",
        "--val_permille=200",
    )
    assert "skipped 1 with no assistant turn, dropped 1 longer than block_size=256" in proc.stdout
    counts = json.loads((out / "manifest.json").read_text())["docs"]
    assert counts == {"conversations": 39, "kept": 37, "no_assistant": 1, "too_long": 1}
    tok = Tokenizer(str(out / "tokenizer.model"))
    answers = []
    for split in ("train", "val"):
        ids, mask = open_shard(out / f"{split}_000000.bin"), open_shard(out / f"{split}_000000.mask", 2)
        assert len(ids) == len(mask) and set(np.unique(mask)) <= {0, 1}
        answers += masked_segments(tok, ids.tolist(), mask.tolist())
    assert sorted(answers) == sorted(["4, written\n    four.", "6 \u2581 six"] + ["4, written\n    four."] * 36)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "narrator", "content": "x"}]}) + "\n")
    proc = run(
        "prepare.py",
        "--mode=sft",
        f"--input={bad}",
        f"--data_dir={tmp_path / 'bad'}",
        f"--tokenizer={tiny_data / 'tokenizer.model'}",
        check=False,
    )
    assert proc.returncode != 0 and proc.stderr.startswith("error: conversation 0: unknown role 'narrator'")


# sft.py run as a user would, every (inputs, targets) batch its model is called with saved to the file argv[1]
RECORD_BATCHES = """
import runpy, sys, torch
import model
batches, forward = [], model.GPT.forward
def record(self, idx, targets=None, *args, **kwargs):
    if targets is not None:
        batches.append((idx.cpu(), targets.cpu()))
    return forward(self, idx, targets, *args, **kwargs)
model.GPT.forward = record
path, sys.argv = sys.argv[1], ["sft.py", *sys.argv[2:]]
runpy.run_path("sft.py", run_name="__main__")
torch.save(batches, path)
"""


def expected_targets(tok, x):
    """The targets of one padded row x, from its tokens alone: the next token where it is assistant text or the
    <|end|> closing it, else -1. A row is a conversation less its last token, the <|end|> of its last turn."""
    specials = {tok.bos_id, *(tok.special[r] for r in chat.ROLES.values())}
    real = int(np.flatnonzero(x)[-1]) + 1  # padding is 0 after the conversation
    seq, role, y = [*x[:real].tolist(), tok.special[chat.END]], None, [-1] * len(x)
    for i, t in enumerate(seq):
        role = t if t in specials else role
        if i and t not in specials and role == tok.special[chat.ROLES["assistant"]]:
            y[i - 1] = t
    return torch.tensor(y)


def test_sft_batches_train_only_on_assistant_text(tiny_data, tmp_path):
    """On the batches sft.py builds (train and validation), the targets are -1 on the system and user turns,
    the role tokens and the padding, and are the next token on assistant text and its closing <|end|>. With
    replay=0.5, half of each training batch's rows are windows of the pretraining data, the batch's length, with
    every target the next token."""
    rows = [{"prompt_id": str(i), "messages": CONVERSATION if i % 2 else CONVERSATION[1:3]} for i in range(40)]
    (tmp_path / "chats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tokenizer, data, base = tiny_data / "tokenizer.model", tmp_path / "data", tmp_path / "base"
    run(
        "prepare.py",
        "--mode=sft",
        f"--input={tmp_path / 'chats.jsonl'}",
        f"--data_dir={data}",
        f"--tokenizer={tokenizer}",
    )
    config = GPTConfig(block_size=128, vocab_size=512, n_layer=1, n_head=2, n_embd=32, mlp_hidden=64)
    base.mkdir()
    pretrained = dict(muon_lr=0.02, learning_rate=0.006, data_dir=str(tiny_data))  # what sft.py reads of it
    state = dict(model=GPT(config).state_dict(), model_args=asdict(config), config=pretrained)
    checkpoints.save_checkpoint(base, 1, state, 1, True)
    shutil.copyfile(tokenizer, base / "tokenizer.model")
    args = [
        "--device=cpu",
        "--batch_size=4",
        "--max_iters=3",
        "--eval_iters=2",
        "--num_samples=0",
        "--max_new_tokens=1",
        "--replay=0.5",
    ]
    cmd = [sys.executable, "-c", RECORD_BATCHES, tmp_path / "batches.pt"]
    run("sft.py", f"--init_from={base}", f"--data_dir={data}", f"--out_dir={tmp_path / 'sft'}", *args, cmd=cmd)
    batches = torch.load(tmp_path / "batches.pt")
    tok = Tokenizer(str(tokenizer))
    assert len(batches) >= 3 + 2  # three steps, and validation at steps 0 and 3
    prompter = {tok.special[r] for r in ("<|system|>", "<|user|>")}
    seen_system, mixed = False, 0
    for x, y in batches:
        windows = [
            (y[:, :-1] == x[:, 1:]).all(1) & (y != -1).all(1) & ~torch.isin(x, torch.tensor(sorted(prompter))).any(1)
        ]
        windows = windows[0].tolist()  # which rows are pretraining windows
        if len(x) == 4 and windows == [False, False, True, True]:
            mixed += 1  # a training batch: two conversations, then two replayed windows
        for row_x, row_y, window in zip(x, y, windows, strict=True):
            if window:
                continue
            torch.testing.assert_close(row_y, expected_targets(tok, row_x.numpy()), rtol=0, atol=0)
            seen_system |= tok.special["<|system|>"] in row_x.tolist()
            assert prompter & set(row_x.tolist()) and (row_y != -1).any()  # not vacuous: both kinds of text
    assert seen_system and mixed == 3
    records = [json.loads(line) for line in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["replay_loss"] > 1 for r in records if "loss" in r)  # ~ln(512) for an untrained model
    assert all(math.isfinite(r["pretrain_val_loss"]) for r in records if "val_loss" in r)


def test_sft_learns_the_demo_set_and_chat_answers(sft_base, tmp_path):
    """From the shared 20-step base run (conftest.sft_base), 40 steps at lr_frac=1.0 with replay on (the default)
    lower the masked validation loss by 0.5; the run reports how often answers end a turn, and chats."""
    (base, sft_data), out = sft_base, tmp_path / "sft"
    proc = run(
        "sft.py",
        f"--init_from={base}",
        f"--data_dir={sft_data}",
        f"--out_dir={out}",
        "--device=cpu",
        "--batch_size=8",
        "--max_iters=40",
        "--eval_interval=40",
        "--eval_iters=2",
        "--max_new_tokens=8",
        "--log_interval=5",
        "--lr_frac=1.0",
    )
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val = {r["step"]: r["val_loss"] for r in records if "val_loss" in r}
    assert val[40] < val[0] - 0.5, val
    assert "end-of-turn:" in proc.stdout and any("eot_rate" in r for r in records)
    assert "Warning" not in proc.stderr, proc.stderr  # our lines only: the answers' prompt tensor warned (issue 36)
    answer = run(
        "sample.py",
        f"--out_dir={out}",
        "--chat",
        "--start=What does json.dumps do?",
        "--max_new_tokens=8",
        "--device=cpu",
    )
    assert answer.stdout.strip() and "you>" not in answer.stdout
    piped = run(
        "sample.py",
        f"--out_dir={out}",
        "--chat",
        "--max_new_tokens=8",
        "--device=cpu",
        cmd=None,
        stdin="What does os.getcwd do?\nAnd os.listdir?\n",
    )
    assert len(piped.stdout.strip().splitlines()) >= 2
    # the finished run resumed, as reference.sh does after a later stage stopped: done at once, nothing re-checked
    again = run(
        "sft.py",
        "--init_from=resume",
        f"--data_dir={sft_data}",
        f"--out_dir={out}",
        "--device=cpu",
        "--batch_size=8",
        "--max_iters=40",
        "--max_new_tokens=8",
    )
    assert "done: 40 steps" in again.stdout and "end-of-turn:" not in again.stdout, again.stdout
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum("eot_rate" in r for r in records) == 1


def test_base_tokenizer_without_chat_tokens_is_refused(tiny_data, tmp_path):
    base = tmp_path / "base"
    run("train.py", f"--data_dir={tiny_data}", f"--out_dir={base}", *TINY, "--max_iters=2", "--eval_interval=2")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(["plain text without specials"] * 50), model_writer=model, vocab_size=19, minloglevel=2
    )
    (base / "tokenizer.model").write_bytes(model.getvalue())
    args = [f"--init_from={base}", f"--out_dir={tmp_path / 'sft'}", f"--data_dir={tmp_path}", "--device=cpu"]
    proc = run("sft.py", *args, check=False)  # data_dir exists (a fresh clone has no data/): the tokenizer is refused
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: ") and "chat tokens" in proc.stderr


def test_sft_resume_matches_uninterrupted(tiny_data, tmp_path):
    """A run stopped at step 3 and resumed logs the losses of one that never stopped. That one has batch_size=auto
    (out of memory faked above 3 x 64 tokens: it picks 2 for its global batch of 4, the stopped run's setting) and
    patience=1 with the validation loss forced up after step 3: it stops at step 6 of 9, ckpt_best at step 3."""
    base, sft_data = tmp_path / "base", tmp_path / "sft_data"
    # pretrained with AdamW, fine-tuned with Muon: a new run starts with fresh optimizer state
    pretrain = ["--max_iters=4", "--eval_interval=4", "--optimizer=adamw"]
    run("train.py", f"--data_dir={tiny_data}", f"--out_dir={base}", *TINY, *pretrain)
    run("prepare.py", "--mode=sft", f"--data_dir={sft_data}", f"--tokenizer={base / 'tokenizer.model'}")
    common = [
        f"--init_from={base}",
        f"--data_dir={sft_data}",
        "--device=cpu",
        "--global_batch_size=4",
        "--eval_iters=1",
        "--max_new_tokens=4",
        "--log_interval=1",
        "--lr_decay_iters=6",
        "--ckpt_interval=3",
        "--eval_interval=3",
        "--num_samples=1",
        "--patience=1",
    ]
    full, split, seams = tmp_path / "full", tmp_path / "split", dict(FAKE_OOM=3 * 64, FORCE_VAL="3:1.0")
    proc = patched("sft.py", *common, f"--out_dir={full}", "--max_iters=9", "--batch_size=auto", **seams)
    assert "batch_size=auto: 2 (4 ran out of memory) -> gradient_accumulation_steps=2" in proc.stdout
    assert "early stop at step 6" in proc.stdout and "end-of-turn:" in proc.stdout
    assert checkpoints.load_checkpoint(full / checkpoints.BEST)["iter_num"] == 3
    patched("sft.py", *common, f"--out_dir={split}", "--max_iters=3", "--batch_size=2", **seams)
    resume = [*[a for a in common if not a.startswith("--init_from")], "--init_from=resume", "--batch_size=2"]
    proc = run("sft.py", *resume, f"--out_dir={split}", "--max_iters=6", "--optimizer=adamw", check=False)
    assert_one_line_error(proc, "trained with optimizer=muon", "says optimizer=adamw")
    patched("sft.py", *resume, f"--out_dir={split}", "--max_iters=6", **seams)

    def losses(out):
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in records if "loss" in r}

    assert list(losses(full)) == [1, 2, 3, 4, 5, 6]
    assert losses(full) == losses(split)
    assert_memory_fields([json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()])
    # the resumed run's checkpoints still name the pretrained run it started from (eval.py follows it back)
    latest = checkpoints.load_checkpoint(checkpoints.find_checkpoint(split, "latest"))
    assert latest["iter_num"] == 6 and latest["config"]["init_from"] == str(base)


def test_errors_name_the_flag_the_user_set(tmp_path):
    """A missing or empty run folder is reported against the flag that named it: --init_from for the run SFT and
    DPO start from, --out_dir when resuming (issue 17: sft.py --init_from=out/none said "check --out_dir")."""
    (tmp_path / "empty").mkdir()
    for script in ("sft.py", "dpo.py"):
        for args, words in [
            ([f"--init_from={tmp_path / 'none'}"], ["does not exist", "init_from="]),  # runtime.configure's check
            ([f"--init_from={tmp_path / 'empty'}"], ["no checkpoint", "check --init_from"]),
            (["--init_from=resume", f"--out_dir={tmp_path / 'none'}"], ["does not exist", "check --out_dir"]),
        ]:
            proc = run(script, *args, f"--data_dir={tmp_path}", "--device=cpu", check=False)  # a folder that exists
            assert_one_line_error(proc, *words)
            assert "--out_dir" not in proc.stderr or "resume" in args[0], proc.stderr
