"""train.py and sample.py run as a user would: resume, DDP, checkpoints and every bad input of the issue."""

import errno
import hashlib
import json
import math
import os
import resource
import shutil
import signal
import sys
import threading

import numpy as np
import pytest
import safetensors.torch
import torch
from conftest import REPO, TINY, assert_memory_fields, patched, run

import checkpoints
import disk
from runtime import UserError
from shards import open_shard, write_shard


def train(data, out, *extra, check=True):
    return run("train.py", f"--data_dir={data}", f"--out_dir={out}", *TINY, *extra, check=check)


def records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def metrics(out, key="loss"):
    return {r["step"]: r[key] for r in records(out) if key in r}


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_one_line_error(proc, *fragments):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    line = proc.stderr.strip()
    assert line.startswith("error: ") and "\n" not in line, line
    for fragment in fragments:
        assert fragment in line, line


def test_resume_matches_uninterrupted_run(tiny_data, tmp_path):
    """Stopped at step 4 and resumed, a run logs the same losses as one that never stopped. Both follow a sequence-
    length curriculum that switches from 32 to 64 tokens there, with twice as many rows before it. The uninterrupted
    run has batch_size=auto, out of memory faked above 4 x 64 tokens: it picks 4 for its global batch of 32, and
    its dry runs change nothing; the resumed one keeps the checkpoint's 4 without a search. Validation losses are
    forced up after step 2, with patience=2: both runs stop at step 6 (exit 0), the stopped one's count of step 4
    having gone into its checkpoint, and ckpt_best holds step 2, the lowest validation loss."""
    common = ["--lr_decay_iters=8", "--ckpt_interval=4", "--eval_interval=2", "--block_size_schedule=32:0.5,64:0.5"]
    common += [f"--data_dir={tiny_data}", *TINY, "--patience=2", "--keep_last=2"]
    full, split, shapes = tmp_path / "full", tmp_path / "split", tmp_path / "shapes.jsonl"
    auto, seams = ["--batch_size=auto", "--global_batch_size=32"], dict(FAKE_OOM=4 * 64, FORCE_VAL="2:1.0")
    proc = patched("train.py", f"--out_dir={full}", "--max_iters=8", *common, *auto, **seams, RECORD_SHAPES=shapes)
    assert "batch_size=auto: 4 (32, 16, 8 ran out of memory) -> gradient_accumulation_steps=8" in proc.stdout
    assert (
        "early stop at step 6: validation loss" in proc.stdout and "ckpt_best.safetensors holds step 2" in proc.stdout
    )
    micro_batches = [tuple(json.loads(line)) for line in shapes.read_text().splitlines()]
    # the dry runs (three out of memory, the forward passes of the one that fits), then 8 micro-batches a step
    assert micro_batches == [(32, 64), (16, 64), (8, 64), (4, 64), (4, 64)] + [(8, 32)] * 32 + [(4, 64)] * 16
    patched("train.py", f"--out_dir={split}", "--max_iters=4", *common, **seams)  # schedule fixed by lr_decay_iters
    proc = patched("train.py", f"--out_dir={split}", "--max_iters=8", "--init_from=resume", *common, *auto, **seams)
    assert "batch_size=auto: 4 (the checkpoint's choice)" in proc.stdout and "early stop at step 6" in proc.stdout
    a, b = metrics(full), metrics(split)
    assert list(a) == list(range(1, 7)) and a == b and a[6] < a[1]  # the same losses, to the last bit
    val = metrics(full, "val_loss")
    assert val == metrics(split, "val_loss") and min(val[s] for s in (2, 4, 6)) == val[2] < val[4] < val[6]
    best = checkpoints.load_checkpoint(full / checkpoints.BEST)
    assert best["iter_num"] == 2 and best["val_loss"] == val[2]
    assert records(full)[-1] == {"step": 6, "early_stop": True, "best_val_loss": val[2], "best_step": 2}
    assert list(metrics(full, "seq_len").values()) == [32] * 4 + [64] * 2
    # the cosine schedule after warmup_iters=2 to lr_decay_iters=8: step s trains at the rate of s - 1
    cosine = [0.1 + 0.45 * (1 + math.cos(math.pi * (s - 3) / 6)) for s in (3, 4, 5, 6)]
    assert list(metrics(full, "lr_mult").values()) == pytest.approx([0.5, 1.0, *cosine])
    assert set(metrics(full, "muon_momentum").values()) == {0.95}  # no momentum warmup: muon_momentum throughout
    assert checkpoints.load_checkpoint(full / "ckpt_0000006.safetensors")["config"]["batch_size"] == 4
    assert_memory_fields(records(full))
    # val records carry tokens seen (8 x 4 x 64 a step at every length) and wall time, which a resume continues
    val = [r for r in records(split) if "val_loss" in r]
    assert [(r["step"], r["tokens"]) for r in val] == [(s, s * 2048) for s in (0, 2, 4, 6)]
    elapsed = [r["elapsed_s"] for r in records(split) if "elapsed_s" in r]
    assert elapsed == sorted(elapsed) and 0 <= val[0]["elapsed_s"] < val[1]["elapsed_s"]
    saved = checkpoints.load_checkpoint(split / "ckpt_0000004.safetensors")["elapsed_s"]
    assert metrics(split, "elapsed_s")[5] > saved >= val[2]["elapsed_s"]  # step 5 is the resumed run's first
    # rotation keeps the last keep_last=2 step checkpoints (each new best and the last are saved) plus the best
    names = sorted(p.name for p in full.glob("ckpt_*"))
    assert names == ["ckpt_0000004.safetensors", "ckpt_0000006.safetensors", "ckpt_best.safetensors"]
    assert (full / "tokenizer.model").is_file()


def test_optimizer_keys_follow_their_schedules_and_resume_exactly(tiny_data, tmp_path):
    """Every optimizer and schedule key on: lr_schedule=wsd (flat after warmup, then linear over the last half),
    Muon's momentum warmup, its own weight decay and cautious weight decay. The logged rates and momenta are the
    ones written out here, and a run stopped at step 4 and resumed ends with the same weights and optimizer state,
    bit for bit, as one that never stopped. muon_momentum=1 (a buffer that never leaves zero) is refused."""
    keys = ["--lr_schedule=wsd", "--cooldown_frac=0.5", "--muon_momentum_warmup=6", "--muon_momentum_start=0.8"]
    keys += ["--muon_weight_decay=0.5", "--weight_decay=0.1", "--cautious_wd=true", "--ckpt_interval=4"]
    keys += ["--lr_decay_iters=8"]  # the stopped run's schedule is the 8 steps'

    full, split = tmp_path / "full", tmp_path / "split"
    train(tiny_data, full, "--max_iters=8", *keys)
    train(tiny_data, split, "--max_iters=4", *keys)
    train(tiny_data, split, "--max_iters=8", "--init_from=resume", *keys)
    # step s logs the rates it trained with, the schedule's at s - 1: warmup 0.5, 1; flat to 4 = 8 x (1 - 0.5);
    # then 1 - 0.9 (s - 1 - 4) / 4 down towards min_lr_frac=0.1
    assert list(metrics(full, "lr_mult").values()) == pytest.approx([0.5, 1, 1, 1, 1, 0.775, 0.55, 0.325])
    momenta = [0.8 + 0.15 * it / 6 for it in range(6)] + [0.95, 0.95]
    assert list(metrics(full, "muon_momentum").values()) == pytest.approx(momenta)
    assert metrics(full, "muon_lr")[2] == 0.02 and metrics(full, "adamw_lr")[6] == pytest.approx(0.006 * 0.775)
    assert metrics(full) == metrics(split)
    a = checkpoints.load_checkpoint(full / "ckpt_0000008.safetensors")
    b = checkpoints.load_checkpoint(split / "ckpt_0000008.safetensors")
    for name, w in a["model"].items():
        assert torch.equal(w, b["model"][name]), name
    for p, state in a["optimizer"]["state"].items():
        for k, v in state.items():
            assert torch.equal(v, b["optimizer"]["state"][p][k]), (p, k)
    assert [g["weight_decay"] for g in a["optimizer"]["param_groups"]] == [0.5, 0.1, 0.0]
    proc = train(tiny_data, tmp_path / "frozen", "--muon_momentum=1.0", check=False)
    assert_one_line_error(proc, "muon_momentum=1.0: expected a number >= 0 and below 1")


def test_ddp_two_ranks_match_one_rank(tiny_data, tmp_path):
    """Two ranks train as one on the same global batch of 8. The two ranks choose their micro-batch with
    batch_size=auto, out of memory faked above 4 x 64 tokens on rank 0 and 2 x 64 on rank 1: both take the smaller,
    2. Losses agree within 1e-4; so do the AdamW parameters. Muon's matrices may differ by more where micro-batches
    of 2 (against 4) flip a bf16 rounding inside Newton-Schulz: 7e-4 measured, as in tests/test_mlx.py."""
    common = ["--max_iters=4", "--eval_interval=4", "--ckpt_interval=4"]
    train(tiny_data, tmp_path / "one", *common, "--gradient_accumulation_steps=2")
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(REPO / "tests" / "patched.py"),
        str(REPO / "train.py"),
    ]
    auto = ["--batch_size=auto", "--global_batch_size=8"]
    env = {**os.environ, "FAKE_OOM": f"{4 * 64},{2 * 64}"}
    two = tmp_path / "two"
    proc = run("torchrun", f"--data_dir={tiny_data}", f"--out_dir={two}", *TINY, *common, *auto, cmd=torchrun, env=env)
    assert "batch_size=auto: 2 (the whole step's share fits; 4 fits here but not on every rank) -> " in proc.stdout
    assert "-> gradient_accumulation_steps=4 for a global batch of 8" in proc.stdout
    assert checkpoints.load_checkpoint(two / "ckpt_0000004.safetensors")["config"]["batch_size"] == 2
    one, two = metrics(tmp_path / "one"), metrics(two)
    assert list(one) == [1, 2, 3, 4]
    for step in one:
        assert math.isclose(one[step], two[step], rel_tol=1e-4), (step, one[step], two[step])
    w1 = checkpoints.load_checkpoint(tmp_path / "one" / "ckpt_0000004.safetensors")["model"]
    w2 = checkpoints.load_checkpoint(tmp_path / "two" / "ckpt_0000004.safetensors")["model"]
    for k in w1:
        assert torch.allclose(w1[k], w2[k], atol=2e-3 if w1[k].ndim == 2 and "wte" not in k else 1e-4), k


def small_data(tiny_data, folder):
    """tiny_data's tokenizer and validation shard, and 1,500 of its training tokens in two shards of 700 and 800: 10 +
    12 = 22 windows of 65 tokens at block_size=64, so a global batch of 8 sequences reads a pass in under 3 steps."""
    folder.mkdir()
    for name in ("tokenizer.model", "val_000000.bin"):
        shutil.copyfile(tiny_data / name, folder / name)
    tokens = np.asarray(open_shard(tiny_data / "train_000000.bin"))[:1500]
    write_shard(folder / "train_000000.bin", tokens[:700], 512)
    write_shard(folder / "train_000001.bin", tokens[700:], 512)
    return folder


def test_epoch_order_resumes_exactly_and_two_ranks_match_one(tiny_data, tmp_path):
    """data_order=epoch over 22 windows, 8 a step: 8 steps read ~2.9 passes. A run stopped at step 4 (in the second
    pass, 32 - 22 = 10 windows into it) and resumed logs the same losses as one that never stopped, and its loss
    falls. Two ranks of one micro-batch of 4 each see the global batch that one rank sees in two. A resume with the
    other data_order is refused with one line."""
    data = small_data(tiny_data, tmp_path / "small")
    common = [f"--data_dir={data}", *TINY, "--data_order=epoch", "--lr_decay_iters=8", "--ckpt_interval=4"]
    common += ["--eval_interval=4", "--gradient_accumulation_steps=2"]
    full, split, two = tmp_path / "full", tmp_path / "split", tmp_path / "two"
    run("train.py", f"--out_dir={full}", "--max_iters=8", *common)
    run("train.py", f"--out_dir={split}", "--max_iters=4", *common)
    state = checkpoints.load_checkpoint(split / "ckpt_0000004.safetensors")["data"]
    assert state == {"seed": 1337, "epoch": 1, "index": 10}
    random = [arg for arg in common if arg != "--data_order=epoch"]
    proc = run("train.py", f"--out_dir={split}", "--max_iters=8", "--init_from=resume", *random, check=False)
    assert_one_line_error(proc, "made with data_order=epoch; resume with --data_order=epoch")
    run("train.py", f"--out_dir={split}", "--max_iters=8", "--init_from=resume", *common)
    a, b = metrics(full), metrics(split)
    assert list(a) == list(range(1, 9)) and a == b and a[8] < a[1] - 0.5
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    run("torchrun", f"--out_dir={two}", "--max_iters=4", *common, cmd=[*torchrun, str(REPO / "train.py")])
    for step, loss in metrics(two).items():
        assert math.isclose(loss, a[step], rel_tol=1e-4), (step, loss, a[step])


def test_checkpoint_guards(tiny_data, tmp_path):
    out = tmp_path / "run"
    train(tiny_data, out, "--max_iters=4", "--ckpt_interval=2", "--eval_interval=2")
    ckpt = out / "ckpt_0000004.safetensors"
    before = digest(ckpt)

    # an existing run is not replaced unless asked
    assert_one_line_error(train(tiny_data, out, "--max_iters=2", check=False), "already holds a run")
    assert digest(ckpt) == before

    # a diverging run stops with a clear message and leaves the last good checkpoint as it was
    proc = train(
        tiny_data,
        out,
        "--max_iters=8",
        "--init_from=resume",
        "--learning_rate=1e30",
        "--muon_lr=1e30",
        "--ckpt_interval=2",
        check=False,
    )
    assert_one_line_error(proc, "loss is nan", "untouched")  # "loss" or "validation loss"
    assert digest(ckpt) == before and not (out / "ckpt_0000006.safetensors").exists()

    # resuming with another optimizer is refused: Muon's state is not AdamW's
    proc = train(tiny_data, out, "--max_iters=8", "--init_from=resume", "--optimizer=adamw", check=False)
    assert_one_line_error(proc, "trained with optimizer=muon", "says optimizer=adamw", "--optimizer=muon")
    assert digest(ckpt) == before

    # resuming with another architecture is refused
    assert_one_line_error(
        train(tiny_data, out, "--max_iters=8", "--init_from=resume", "--n_embd=32", check=False),
        "n_embd=64",
        "n_embd=32",
    )

    # sample.py: prompt longer than the context is cut from the left, and says so
    long_prompt = tmp_path / "prompt.txt"
    long_prompt.write_text("x = 1\n" * 200)
    proc = run("sample.py", f"--out_dir={out}", f"--start=FILE:{long_prompt}", "--max_new_tokens=5", "--num_samples=1")
    assert "keeping its last 64 tokens" in proc.stderr and proc.stdout.strip()

    # a truncated checkpoint: one line, for resume and for sampling, and the file is left for inspection
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])
    for proc in (
        train(tiny_data, out, "--max_iters=8", "--init_from=resume", check=False),
        run("sample.py", f"--out_dir={out}", "--ckpt=latest", check=False),
    ):
        assert_one_line_error(proc, "truncated or corrupted")
    assert ckpt.stat().st_size == len(data) // 2

    # a checkpoint of another architecture (nanoGPT-style model_args, or mismatched weights)
    good = checkpoints.load_checkpoint(out / "ckpt_0000002.safetensors")
    alien = {"model": good["model"], "model_args": {**good["model_args"], "bias": False}}
    checkpoints.atomic_save(alien, out / "alien.safetensors")
    assert_one_line_error(
        run("sample.py", f"--out_dir={out}", "--ckpt=alien.safetensors", check=False), "another architecture"
    )
    good["model"]["transformer.h.0.mlp.c_fc.weight"] = torch.zeros(3, 3)
    checkpoints.atomic_save(good, out / "reshaped.safetensors")
    assert_one_line_error(
        run("sample.py", f"--out_dir={out}", "--ckpt=reshaped.safetensors", check=False), "another architecture", "c_fc"
    )

    # a safetensors file that is not ours (plain weights with no structure), and an old torch.save file
    safetensors.torch.save_file({"w": torch.zeros(2)}, out / "foreign.safetensors")
    assert_one_line_error(
        run("sample.py", f"--out_dir={out}", "--ckpt=foreign.safetensors", check=False), "not an AnarchoBot checkpoint"
    )
    torch.save(good, out / "old.pt")
    assert_one_line_error(run("sample.py", f"--out_dir={out}", "--ckpt=old.pt", check=False), "truncated or corrupted")


# Runs the script argv[2:] with a file size limit of argv[1] bytes; a write past it kills the process (SIGXFSZ,
# which Python ignores unless told otherwise), as a crash or an out-of-disk kill would, halfway through a file.
KILLED_AT_FILE_SIZE = """
import resource, runpy, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_run_killed_while_writing_a_checkpoint_resumes_from_the_last_complete_one(tiny_data, tmp_path):
    """Killed halfway through writing step 6's checkpoint: the checkpoints before it and ckpt_best are as they
    were, no partial file carries a checkpoint's name, and --init_from=resume goes on from step 4: its steps 5
    and 6 are the killed run's, to the last bit."""
    out, common = tmp_path / "run", ["--ckpt_interval=2", "--eval_interval=2", "--lr_decay_iters=6"]
    train(tiny_data, out, "--max_iters=4", *common)

    def saved_files():
        return {p.name: digest(p) for p in out.glob("ckpt_*.safetensors")}

    before = saved_files()
    assert sorted(before) == ["ckpt_0000002.safetensors", "ckpt_0000004.safetensors", "ckpt_best.safetensors"]
    limit = (out / "ckpt_0000004.safetensors").stat().st_size // 2
    assert (out / "tokenizer.model").stat().st_size < limit  # the resumed run copies it in before training
    killer = [sys.executable, "-c", KILLED_AT_FILE_SIZE, str(limit), str(REPO / "train.py")]
    args = [f"--data_dir={tiny_data}", f"--out_dir={out}", *TINY, *common, "--max_iters=6", "--init_from=resume"]
    killed = run("train.py", *args, cmd=killer, check=False)
    assert killed.returncode == -signal.SIGXFSZ, (killed.returncode, killed.stderr[-2000:])
    assert "step 6: val loss" in killed.stdout and "saved" not in killed.stdout  # killed while saving step 6
    assert saved_files() == before
    assert all(checkpoints.load_checkpoint(out / name)["iter_num"] in (2, 4) for name in before)
    train(tiny_data, out, "--max_iters=6", "--init_from=resume", *common)
    losses = [(r["step"], r["loss"]) for r in records(out) if "loss" in r]
    assert [step for step, _ in losses] == [1, 2, 3, 4, 5, 6, 5, 6]  # metrics.jsonl: started, killed, resumed
    assert losses[4:6] == losses[6:8]
    assert checkpoints.load_checkpoint(out / "ckpt_0000006.safetensors")["iter_num"] == 6


def test_checkpoint_file_is_safetensors_own(tmp_path):
    """checkpoints.encode writes safetensors' format itself: safetensors reads back every dtype a run stores
    (bfloat16 without a numpy dtype, bool, int64 counters, 0-d and empty tensors) to the bit, and a tied tensor once."""
    tied = torch.randn(8, 4)
    state = {
        "model": {"wte": tied, "head": tied, "bf16": torch.randn(3, 5).to(torch.bfloat16)},
        "optimizer": {"state": {0: {"step": torch.tensor(7), "mask": torch.rand(6) > 0.5}}},
        "rng": torch.randint(0, 255, (33,), dtype=torch.uint8),
        "empty": torch.zeros(0, 4),
        "model_args": {},
        "iter_num": 3,
    }
    path = tmp_path / "c.safetensors"
    checkpoints.atomic_save(state, path)
    raw = safetensors.torch.load_file(path)
    assert sorted(raw) == [
        "empty",
        "model/bf16",
        "model/wte",
        "optimizer/state/0/mask",
        "optimizer/state/0/step",
        "rng",
    ]
    back = checkpoints.load_checkpoint(path)
    assert back["model"]["head"] is back["model"]["wte"] and torch.equal(back["model"]["wte"], tied)
    assert back["model"]["bf16"].dtype == torch.bfloat16 and torch.equal(back["model"]["bf16"], state["model"]["bf16"])
    step = back["optimizer"]["state"][0]["step"]
    assert (
        step.dim() == 0
        and step.item() == 7
        and torch.equal(back["optimizer"]["state"][0]["mask"], state["optimizer"]["state"][0]["mask"])
    )
    assert torch.equal(back["rng"], state["rng"]) and back["empty"].shape == (0, 4) and back["iter_num"] == 3


def test_saver_writes_what_the_state_was_at_save(tmp_path, monkeypatch, capsys):
    """Saver.save returns while its write waits; the weights changed in place after it (the next steps) do not reach
    the file; "saved" is printed once the file is there; a failed write is raised by check(), once."""
    w = torch.zeros(1000)
    started, go = threading.Event(), threading.Event()
    write = disk.write_atomic

    def held(path, data, then):
        started.set()
        assert go.wait(10)
        write(path, data, then)

    monkeypatch.setattr(disk, "write_atomic", held)
    saver = checkpoints.Saver()
    saver.save(tmp_path, 1, {"model": {"w": w}, "model_args": {}, "iter_num": 1}, keep_last=2, is_best=True)
    assert started.wait(10) and not (tmp_path / "ckpt_0000001.safetensors").exists()
    w.add_(1.0)  # the next training step
    go.set()
    saver.finish()
    assert torch.equal(checkpoints.load_checkpoint(tmp_path / checkpoints.BEST)["model"]["w"], torch.zeros(1000))
    assert capsys.readouterr().out == f"saved {tmp_path / 'ckpt_0000001.safetensors'} (best so far)\n"

    def full(path, data, then):
        raise UserError(f"no space left in {tmp_path}")

    monkeypatch.setattr(disk, "write_atomic", full)
    saver.save(tmp_path, 2, {"model": {"w": w}, "model_args": {}, "iter_num": 2}, keep_last=2, is_best=False)
    saver.thread.join()
    with pytest.raises(UserError, match="no space left"):
        saver.check()
    saver.check()  # raised once
    saver.finish()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_0000001.safetensors", checkpoints.BEST]


def test_best_checkpoint_survives_a_copy_that_stops_halfway(tmp_path, monkeypatch):
    """On a file system without hard links ckpt_best is a copy. The step checkpoint is written whole, then the copy
    runs out of room halfway (the file size limit: EFBIG): the previous best is still whole and loadable, and so is
    the step checkpoint before; the new one, which records itself as the best, is removed with the failed copy, so
    a resumed run saves both again (tests/test_full_disk.py has the hard links and ENOSPC)."""

    def state(step):
        return {"model": {"w": torch.full((1 << 16,), float(step))}, "model_args": {}, "iter_num": step}

    def no_links(src, dst):
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))

    monkeypatch.setattr(os, "link", no_links)
    checkpoints.save_checkpoint(tmp_path, 1, state(1), keep_last=3, is_best=True)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    half = (tmp_path / checkpoints.BEST).stat().st_size // 2
    write = disk.write_atomic

    def write_then_limit(path, data, then):  # the step checkpoint whole; the copy to ckpt_best then meets the limit
        write(path, data, then)
        resource.setrlimit(resource.RLIMIT_FSIZE, (half, hard))

    monkeypatch.setattr(disk, "write_atomic", write_then_limit)
    try:
        with pytest.raises(OSError, match="File too large"):
            checkpoints.save_checkpoint(tmp_path, 2, state(2), keep_last=3, is_best=True)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert checkpoints.load_checkpoint(tmp_path / checkpoints.BEST)["iter_num"] == 1
    assert checkpoints.load_checkpoint(tmp_path / "ckpt_0000001.safetensors")["iter_num"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_0000001.safetensors", checkpoints.BEST]


def test_data_guards(tiny_data, tmp_path):
    proc = train(tmp_path / "nowhere", tmp_path / "a", check=False)
    assert_one_line_error(proc, "does not exist", "data_dir=")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(train(tmp_path / "empty", tmp_path / "b", check=False), "no train_*.bin")
    assert_one_line_error(
        train(tiny_data, tmp_path / "c", "--vocab_size=1000", check=False), "512-token vocabulary", "vocab_size=1000"
    )
    assert not (tmp_path / "c").exists()  # nothing was written


def test_adamw_trains_and_guards(tiny_data, tmp_path):
    """optimizer=adamw: AdamW for every parameter, so the loss falls, no muon_lr is logged, every parameter has
    AdamW state; resuming it as a Muon run is refused and leaves the run as it was; an unknown value is refused."""
    out = tmp_path / "adamw"
    args = ["--optimizer=adamw", "--learning_rate=0.01", "--eval_interval=8", "--ckpt_interval=8"]
    train(tiny_data, out, *args, "--max_iters=8")
    loss = metrics(out)
    assert list(loss) == list(range(1, 9)) and loss[8] < loss[1] - 0.5, loss
    steps = [r for r in records(out) if "loss" in r]
    assert all("muon_lr" not in r and r["adamw_lr"] == 0.01 * r["lr_mult"] for r in steps)
    ckpt = out / "ckpt_0000008.safetensors"
    state = checkpoints.load_checkpoint(ckpt)
    assert state["config"]["optimizer"] == "adamw"
    moments = state["optimizer"]["state"].values()
    assert len(moments) == len(state["model"]) - 1 and all("exp_avg_sq" in m for m in moments)  # lm_head is wte
    before, lines = digest(ckpt), (out / "metrics.jsonl").read_text()
    proc = train(tiny_data, out, "--max_iters=12", "--init_from=resume", check=False)
    assert_one_line_error(proc, "trained with optimizer=adamw", "says optimizer=muon", "--optimizer=adamw")
    assert digest(ckpt) == before and (out / "metrics.jsonl").read_text() == lines
    assert sorted(p.name for p in out.glob("ckpt_*")) == ["ckpt_0000008.safetensors", "ckpt_best.safetensors"]

    proc = train(tiny_data, tmp_path / "sgd", "--optimizer=sgd", check=False)
    assert_one_line_error(proc, "optimizer=sgd", "expected muon or adamw")
    assert not (tmp_path / "sgd").exists()  # nothing was written


def test_nanogpt_peer_trains_and_stays_a_peer(tiny_data, tmp_path):
    """arch=nanogpt trains peer.py's GPT-2 in the same loop: it starts at about ln(vocab), its loss falls, its
    parameters are GPT-2's (learned positions, biases); resuming it as our GPT, or loading it where our GPT is
    expected, is refused with one line that says what to do. compile_regions (the reference config's) is set
    aside for it, with a line that says so."""
    out = tmp_path / "peer"
    args = ["--arch=nanogpt", "--optimizer=adamw", "--learning_rate=0.01", "--max_iters=8", "--compile_regions=true"]
    assert "compile_regions: set aside" in train(tiny_data, out, *args).stdout
    val = metrics(out, "val_loss")
    assert abs(val[0] - math.log(512)) < 0.3 and val[8] < val[0] - 1.0, val
    state = checkpoints.load_checkpoint(out / "ckpt_0000008.safetensors")
    assert state["config"]["arch"] == "nanogpt" and "transformer.wpe.weight" in state["model"]
    assert "transformer.h.0.attn.c_attn.bias" in state["model"]
    proc = train(tiny_data, out, "--max_iters=12", "--init_from=resume", check=False)
    assert_one_line_error(proc, "holds an arch=nanogpt run", "--arch")
    proc = run("sample.py", f"--out_dir={out}", "--device=cpu", check=False)
    assert_one_line_error(proc, "nanoGPT peer", "--compare=")
    proc = train(tiny_data, tmp_path / "x", "--arch=llama", check=False)
    assert_one_line_error(proc, "arch=llama", "expected gpt")


def test_doc_mask_trains_inside_documents(short_docs, tmp_path):
    """doc_mask=true on short documents: its losses are not the causal run's from the first evaluation on (the
    windows cross boundaries; at init the outputs are near uniform, so the gap starts small, but the CPU runs are
    deterministic: without the mask they would be equal), it learns, its checkpoint says it was trained so; with
    the peer it is refused."""
    args = ["--max_iters=8", "--eval_interval=8", "--learning_rate=0.01"]
    train(short_docs, tmp_path / "causal", *args)
    train(short_docs, tmp_path / "docs", *args, "--doc_mask=true")
    causal, docs = metrics(tmp_path / "causal", "val_loss"), metrics(tmp_path / "docs", "val_loss")
    assert abs(docs[0] - causal[0]) > 1e-5 and docs[8] < docs[0] - 0.5, (causal, docs)
    loss = metrics(tmp_path / "docs")
    assert loss[8] < loss[1] - 0.5 and abs(loss[8] - metrics(tmp_path / "causal")[8]) > 1e-3, loss
    state = checkpoints.load_checkpoint(tmp_path / "docs" / "ckpt_0000008.safetensors")
    assert state["config"]["doc_mask"] is True
    proc = train(short_docs, tmp_path / "peer", "--arch=nanogpt", "--doc_mask=true", check=False)
    assert_one_line_error(proc, "doc_mask=true needs arch=gpt")
    assert not (tmp_path / "peer").exists()
