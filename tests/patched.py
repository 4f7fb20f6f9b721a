"""Run a stage script as a user would (python tests/patched.py train.py --key=value ...), with test seams that the
environment turns on, each optional:

FAKE_OOM=N (or N0,N1,... one per DDP rank): a training micro-batch of more than N tokens runs out of memory, as on
    a GPU, and batch_size=auto may search on the CPU (batching.memory_limit gives no limit of its own there).
FORCE_VAL=S:D: validation losses rise by D for every optimizer step after step S, as when a run overfits (the step
    count is the optimizer's own, or in train_mlx.py the schedule's, so a resumed run goes on with it)
RECORD_SHAPES=PATH: append the (rows, length) of every training micro-batch to PATH, one JSON list a line.
RECORD_INPUTS=PATH: append how every training forward was called, one JSON object a line: the autocast precision it
    ran under (null: none) and whether its tokens and targets were contiguous (as Dynamo's graphs tell them apart).
FAKE_ENOSPC=GLOB: a file opened for writing whose name matches GLOB (ckpt_0000008.safetensors.tmp) is on a full disk:
    its first write stores half the bytes, then fails with ENOSPC, as a write that fills a real disk does.
FAKE_FREE=N: shutil.disk_usage says N bytes are free (the run folder's check before step 0).
ROWS_READ=PATH: append a line to PATH for each row that a datasets stream (prepare.py's --input/--dataset) yields: the
    number of its pass (1, 2, ... in the order the passes start; a resumed stream's skipped rows are not yielded) and
    a CRC32 of the row, so that a test sees which rows each pass of a run read.
"""

import builtins
import errno
import fnmatch
import json
import os
import runpy
import shutil
import sys
import zlib

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import batching  # noqa: E402
import model  # noqa: E402
import runtime  # noqa: E402

forward = model.GPT.forward


def patched_forward(self, idx, targets=None, **kwargs):
    if self.training and "RECORD_SHAPES" in os.environ:
        with open(os.environ["RECORD_SHAPES"], "a") as f:
            f.write(json.dumps(list(idx.shape)) + "\n")
    if self.training and "RECORD_INPUTS" in os.environ:
        cast = torch.get_autocast_dtype(idx.device.type) if torch.is_autocast_enabled(idx.device.type) else None
        call = {"autocast": str(cast).removeprefix("torch.") if cast else None}
        call["contiguous"] = idx.is_contiguous() and (targets is None or targets.is_contiguous())
        with open(os.environ["RECORD_INPUTS"], "a") as f:
            f.write(json.dumps(call) + "\n")
    if self.training and "FAKE_OOM" in os.environ and idx.numel() > fake_oom_tokens():
        raise torch.OutOfMemoryError(f"CUDA out of memory (faked: {idx.numel()} tokens)")
    logits, loss = forward(self, idx, targets, **kwargs)
    if not self.training and loss is not None and loss.dim() == 0:  # a validation loss (not DPO's per-token ones)
        loss = loss + val_rise()
    return logits, loss


def fake_oom_tokens():
    limits = [int(n) for n in os.environ["FAKE_OOM"].split(",")]
    return limits[int(os.environ.get("RANK", 0)) % len(limits)]


optimizers = []


def make_optimizer(*args, **kwargs):
    optimizers.append(make(*args, **kwargs))
    return optimizers[-1]


def val_rise():
    """FORCE_VAL's rise now: D times the optimizer steps past S (the AdamW step count of the embedding)."""
    if "FORCE_VAL" not in os.environ or not optimizers:
        return 0.0
    start, rise = map(float, os.environ["FORCE_VAL"].split(":"))
    state = optimizers[-1].state.get(optimizers[-1].param_groups[1]["params"][0], {})
    return rise * max(0.0, float(state.get("step", 0)) - start)


def patched_logsigmoid(x):  # dpo.py's loss; evaluation runs without gradients, training with them
    return logsigmoid(x) - (0.0 if torch.is_grad_enabled() else val_rise())


def patch_mlx():
    """The seams in train_mlx.py, whose model is the script's own: FAKE_OOM in the loss, which takes the logits of
    every micro-batch; FORCE_VAL where estimate_loss stacks its losses, at the step of the schedule's last call."""
    import mlx.core as mx
    import mlx.nn

    cross_entropy, stack, block_size_at, steps = mlx.nn.losses.cross_entropy, mx.stack, batching.block_size_at, [0]

    def fake_cross_entropy(logits, targets, **kwargs):
        if "FAKE_OOM" in os.environ and targets.size > fake_oom_tokens():
            raise MemoryError(f"[metal::malloc] out of memory (faked: {targets.size} tokens)")
        return cross_entropy(logits, targets, **kwargs)

    def forced_stack(arrays, *args, **kwargs):
        rising = sys._getframe(1).f_code.co_name == "estimate_loss" and "FORCE_VAL" in os.environ
        start, rise = map(float, os.environ.get("FORCE_VAL", "0:0").split(":"))
        return stack(arrays, *args, **kwargs) + (rise * max(0.0, steps[0] - start) if rising else 0.0)

    def counted_block_size_at(stages, it, horizon):
        steps[0] = it + 1  # the step being trained; estimate_loss follows it
        return block_size_at(stages, it, horizon)

    mlx.nn.losses.cross_entropy, mx.stack, batching.block_size_at = (
        fake_cross_entropy,
        forced_stack,
        counted_block_size_at,
    )


class FullDisk:
    """FAKE_ENOSPC's file: the first write keeps half its bytes, then fails as on a full disk."""

    def __init__(self, f):
        self.f = f

    def write(self, data):
        view = data if isinstance(data, str) else memoryview(data).cast("B")
        self.f.write(view[: len(view) // 2])
        self.f.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def full_disk_open(file, mode="r", *args, **kwargs):
    f = real_open(file, mode, *args, **kwargs)
    name = os.path.basename(file) if isinstance(file, (str, os.PathLike)) else ""
    return FullDisk(f) if set(mode) & set("wax+") and fnmatch.fnmatch(name, os.environ["FAKE_ENOSPC"]) else f


def record_rows(iterate):
    """ROWS_READ's IterableDataset.__iter__: iterate's rows, each recorded with its pass's number."""
    passes = [0]

    def recorded(self):
        passes[0] += 1
        number = passes[0]
        for row in iterate(self):
            with open(os.environ["ROWS_READ"], "a") as f:
                f.write(f"{number} {zlib.crc32(json.dumps(row, sort_keys=True, default=str).encode())}\n")
            yield row

    return recorded


model.GPT.forward = patched_forward
make, runtime.make_optimizer = runtime.make_optimizer, make_optimizer
logsigmoid, F.logsigmoid = F.logsigmoid, patched_logsigmoid
if "FAKE_OOM" in os.environ:
    batching.memory_limit = lambda device: 2.0**50
if "FAKE_ENOSPC" in os.environ:
    real_open, builtins.open = builtins.open, full_disk_open
if "FAKE_FREE" in os.environ:
    disk_usage = shutil.disk_usage
    shutil.disk_usage = lambda path: disk_usage(path)._replace(free=int(os.environ["FAKE_FREE"]))
if "ROWS_READ" in os.environ:
    import datasets

    datasets.IterableDataset.__iter__ = record_rows(datasets.IterableDataset.__iter__)
if sys.argv[1].endswith("train_mlx.py"):
    patch_mlx()
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
