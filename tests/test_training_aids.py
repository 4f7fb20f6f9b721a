"""What the training scripts do for their user besides training: batch_size=auto, early stopping, the sequence-length
curriculum and memory monitoring: the helpers in runtime.py, checkpoints.py and batching.py, in process. The scripts
themselves run in the resume tests of tests/test_train.py, test_sft.py, test_dpo.py and test_mlx.py, through
tests/patched.py, which fakes a GPU's out-of-memory error and an overfitting run on the CPU."""

import gc
import mmap
import weakref
from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch

import batching
import checkpoints
import runtime
from model import GPT, GPTConfig
from runtime import UserError

CONFIG = GPTConfig(block_size=32, vocab_size=96, n_layer=2, n_head=2, n_embd=32, mlp_hidden=64)
CPU = dict(device="cpu", autocast=nullcontext(), world_size=1, ddp=False, master=True)


# ----------------------------------------------------------------------------- batch_size=auto


def test_find_batch_size_halves_to_divisors_and_frees_each_try():
    alive = []

    def try_step(size):
        x = torch.zeros(size, 1024)  # what a try holds when it runs out of memory
        alive.append(weakref.ref(x))
        if size > 5:
            raise torch.OutOfMemoryError(f"CUDA out of memory: {size}")

    def free():  # by now the failed try's tensors are gone: the except block (its traceback) has been left
        assert alive[-1]() is None

    assert batching.find_batch_size(try_step, 32, free) == (4, [32, 16, 8, 4])
    assert batching.find_batch_size(try_step, 24, free) == (3, [24, 12, 6, 3])  # 24's divisors, so 8 x 3 = 24
    assert batching.find_batch_size(try_step, 5, free) == (5, [5])

    def never_fits(size):
        raise MemoryError("[metal::malloc] out of memory")

    with pytest.raises(UserError, match="even a micro-batch of 1"):
        batching.find_batch_size(never_fits, 4, gc.collect)
    with pytest.raises(ValueError):  # any other error is not memory: it goes through
        batching.find_batch_size(lambda size: int("x"), 4, free)


def test_dry_run_leaves_model_and_optimizer_as_they_were(monkeypatch):
    torch.manual_seed(0)
    model = GPT(CONFIG)
    optimizer = runtime.make_optimizer(model, 0.02, 0.95, 0.006, (0.9, 0.95), 0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    monkeypatch.setattr(batching, "memory_limit", lambda device: 2.0**50)
    try_step = batching.dry_run(CPU, model, optimizer, lambda x, y: model(x, y)[1], CONFIG.block_size)
    try_step(3)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not optimizer.state and all(p.grad is None for p in model.parameters())
    assert [g["lr"] for g in optimizer.param_groups] == [0.02, 0.006, 0.006]
    monkeypatch.setattr(batching, "memory_limit", lambda device: 1.0)  # a peak past the limit is out of memory too
    with pytest.raises(MemoryError, match="over the"):
        batching.dry_run(CPU, model, optimizer, lambda x, y: model(x, y)[1], CONFIG.block_size)(3)
    assert not optimizer.state and [g["lr"] for g in optimizer.param_groups] == [0.02, 0.006, 0.006]


def test_pick_batch_keeps_the_global_batch_and_a_resume_keeps_its_choice(capsys):
    config = dict(batch_size="auto", gradient_accumulation_steps=1, global_batch_size=48)

    def try_step(size):
        if size > 10:
            raise torch.OutOfMemoryError

    assert batching.pick_batch(config, CPU, 48, None, try_step, gc.collect) == (6, 8)
    assert config["batch_size"] == 6 and config["gradient_accumulation_steps"] == 8  # what checkpoints store
    assert (
        "batch_size=auto: 6 (48, 24, 12 ran out of memory; sizes that divide the 48 per rank)"
        in capsys.readouterr().out
    )
    resumed = dict(config, batch_size="auto")
    assert batching.pick_batch(resumed, CPU, 48, {"config": {"batch_size": 12}}, None) == (12, 4)
    two_ranks = dict(CPU, world_size=2)
    assert batching.pick_batch(dict(config, batch_size=4), two_ranks, 48, None, None) == (4, 12)  # 6 each, per rank
    with pytest.raises(UserError, match="does not divide the 24 sequences per rank"):
        batching.pick_batch(dict(config, batch_size="auto"), two_ranks, 48, {"config": {"batch_size": 16}}, None)


@pytest.mark.parametrize(
    "keys, limit, message",
    [
        (dict(batch_size="auto"), 1e9, "needs global_batch_size|set it too"),
        (dict(batch_size="auto", global_batch_size=64), None, "needs CUDA or MPS"),
        (dict(batch_size=8, global_batch_size=60), 1e9, "global_batch_size=60 does not split"),
        (dict(batch_size=8, gradient_accumulation_steps=3), 1e9, "must divide by 2 ranks"),
    ],
)
def test_check_batch_refuses(keys, limit, message):
    config = dict(dict(batch_size=8, gradient_accumulation_steps=2, global_batch_size=0), **keys)
    with pytest.raises(UserError, match=message):
        batching.check_batch(config, 2, limit)


def test_check_batch_global_batch():
    assert batching.memory_limit("cpu") is None  # so check_batch refuses batch_size=auto on the CPU, before any work
    config = dict(batch_size=8, gradient_accumulation_steps=2, global_batch_size=0)
    assert batching.check_batch(config, 2, None) == 16
    assert batching.check_batch(dict(config, global_batch_size=64), 2, None) == 64
    assert batching.check_batch(dict(config, batch_size="auto", global_batch_size=64), 2, 1e9) == 64


def test_auto_is_accepted_for_batch_size_only():
    defaults = {"batch_size": 8, "n_layer": 2}
    assert runtime.configure(dict(defaults), ["--batch_size=auto"], auto=("batch_size",))["batch_size"] == "auto"
    with pytest.raises(UserError, match="--batch_size=big: expected a int like 8 or auto"):
        runtime.configure(dict(defaults), ["--batch_size=big"], auto=("batch_size",))
    with pytest.raises(UserError, match="--n_layer=auto: expected a int"):
        runtime.configure(dict(defaults), ["--n_layer=auto"], auto=("batch_size",))
    with pytest.raises(UserError, match="--batch_size=auto: expected a int"):  # bench.py has no search
        runtime.configure(dict(defaults), ["--batch_size=auto"])


# ----------------------------------------------------------------------------- early stopping, curriculum, memory


def test_early_stopping_counts_evaluations_since_the_best_checkpoint():
    early = checkpoints.EarlyStopping(patience=2)
    saved = []
    for step, val in enumerate([5.0, 4.0, 4.5, 3.9, 4.1, 4.2, 3.0], start=1):
        early.evaluated(val)
        if early.must_save:  # with patience on, every new best is saved, and so is the state the run stops in
            saved.append((step, early.saved(step, val)))
        if early.stop:
            break
    assert early.stop and step == 6 and early.best == 3.9 and early.best_step == 4
    assert saved == [(1, True), (2, True), (4, True), (6, False)]
    resumed = checkpoints.EarlyStopping(2, 3.9, {"bad_evals": 1, "best_step": 4})
    resumed.evaluated(4.0)
    assert resumed.stop
    off = checkpoints.EarlyStopping(patience=0)
    for val in [1.0, 2.0, 3.0, 4.0]:
        off.evaluated(val)
    assert not off.stop and not off.must_save


def test_block_size_schedule():
    stages = batching.parse_schedule("1024:0.8,4096:0.2", 4096)
    assert stages == [(1024, 0.8), (4096, 0.2)]
    lengths = [batching.block_size_at(stages, it, 10) for it in range(12)]
    assert lengths == [1024] * 8 + [4096] * 4  # the last stage goes on past the horizon
    assert batching.parse_schedule("", 4096) == [(4096, 1.0)]
    for text, message in [("1000:1", "must divide"), ("1024:0.5", "add up to 0.5"), ("1024", "length:share")]:
        with pytest.raises(UserError, match=message):
            batching.parse_schedule(text, 4096)


def test_memory_stats_on_cpu():
    stats = runtime.memory_stats("cpu")
    assert 0.01 < stats["rss_gib"] < 64 and stats["mem_gib"] <= stats["peak_mem_gib"]
    # A fresh anonymous mapping, written through: 64 MiB of new resident pages whatever the allocator holds (a
    # torch tensor may reuse a freed, still-resident heap block left by an earlier test: CI saw no change at all)
    block = mmap.mmap(-1, 64 << 20)
    view = torch.frombuffer(block, dtype=torch.uint8)
    view.fill_(1)
    more = runtime.memory_stats("cpu")
    assert more["rss_gib"] > stats["rss_gib"] + 0.05 and more["peak_mem_gib"] >= more["rss_gib"]
    del view
    block.close()  # unmapped: the resident set shrinks, its peak stays (the kernel's count lags by a few pages)
    after = runtime.memory_stats("cpu")
    assert after["rss_gib"] < more["rss_gib"] - 0.05 and after["peak_mem_gib"] > more["rss_gib"] - 0.01
    line = runtime.format_memory({"mem_gib": 17.31, "peak_mem_gib": 19.8, "rss_gib": 3.1})
    assert line == "mem 17.31/19.80GiB rss 3.10GiB"


def test_memory_readings_on_cuda_and_mps(monkeypatch):
    """The CUDA and MPS branches with the allocators' counters faked (no GPU here): which counter is the current
    memory, which the peak, what batch_size=auto may use, and what is freed between its tries."""
    gib, calls = 2**30, []
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 3 * gib)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: 5 * gib)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=80 * gib))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device: calls.append(f"reset {device}"))
    stats = runtime.memory_stats("cuda:1")
    assert (stats["mem_gib"], stats["peak_mem_gib"]) == (3, 5) and stats["rss_gib"] > 0.01
    assert batching.memory_limit("cuda:1") == 72 * gib
    batching.free_memory("cuda:1")
    assert calls == ["empty_cache", "reset cuda:1"]
    monkeypatch.setattr(torch.mps, "current_allocated_memory", lambda: 2 * gib)
    monkeypatch.setattr(torch.mps, "driver_allocated_memory", lambda: 4 * gib)  # with the allocator's cache
    monkeypatch.setattr(torch.mps, "recommended_max_memory", lambda: 10 * gib)
    stats = runtime.memory_stats("mps")
    assert (stats["mem_gib"], stats["peak_mem_gib"]) == (2, 4) and batching.memory_limit("mps") == 9 * gib
