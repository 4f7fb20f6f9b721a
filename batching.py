"""Batch sizes and sequence lengths, for every trainer: the global batch checked before anything loads,
batch_size=auto (dry runs of the real model at halving micro-batches until one fits the GPU), and the
sequence-length curriculum (block_size_schedule).
"""

import gc

import torch
import torch.distributed as dist

from backends import OOM_TEXTS
from runtime import UserError, memory_stats

AUTO_HEADROOM = 0.9  # batch_size=auto: a dry run may peak at this share of the device's memory; the rest is for
# what it leaves out (DDP's gradient buckets, the allocator's fragmentation, evaluation)


def memory_limit(device):
    """Bytes a batch_size=auto dry run may peak at, or None on the CPU, where running out of memory cannot be
    caught: the kernel's out-of-memory killer ends the process instead of an error being raised."""
    device = str(device)
    if device.startswith("cuda"):  # run on H100 and H200
        return AUTO_HEADROOM * torch.cuda.get_device_properties(device).total_memory
    if device.startswith("mps"):  # never run: Metal's recommended working set (the MPS allocator raises past 1.7x it)
        return AUTO_HEADROOM * torch.mps.recommended_max_memory()
    return None  # run on x86 CPUs


def check_batch(config, world_size, limit):
    """The global batch (sequences per optimizer step, all ranks together), checked before anything is loaded:
    global_batch_size where set (gradient_accumulation_steps then follows from it), else batch_size x
    gradient_accumulation_steps. batch_size=auto needs global_batch_size, and a memory limit (see memory_limit)."""
    B, accum, G = config["batch_size"], config["gradient_accumulation_steps"], config["global_batch_size"]
    if B == "auto" and not G:
        raise UserError(
            "batch_size=auto keeps global_batch_size sequences per step; set it too, e.g. --global_batch_size=64"
        )
    if B == "auto" and limit is None:
        raise UserError(
            "batch_size=auto needs CUDA or MPS: it tries micro-batches until one fits the GPU's memory, and on the "
            "CPU running out of memory kills the process instead; give a number, e.g. --batch_size=8"
        )
    if (B != "auto" and B < 1) or G < 0 or accum < 1:
        raise UserError(f"batch_size={B}, gradient_accumulation_steps={accum}, global_batch_size={G}: must be positive")
    if not G and accum % world_size:
        raise UserError(f"gradient_accumulation_steps={accum} must divide by {world_size} ranks")
    if G and (G % world_size or (B != "auto" and G // world_size % B)):
        raise UserError(
            f"global_batch_size={G} does not split into micro-batches of batch_size={B} on {world_size} rank(s); "
            f"make it a multiple of batch_size x ranks"
        )
    return G or B * accum


def out_of_memory(e):
    """Whether an exception is a device running out of memory: backends.OOM_TEXTS' messages (CUDA's, cuBLAS failing
    to allocate its workspace, MPS's allocator and its buffer-size limit, MLX's) or a dry run's peak past the limit."""
    text = str(e).lower()
    texts = {t for kinds in OOM_TEXTS.values() for t in kinds}
    return isinstance(e, (torch.OutOfMemoryError, MemoryError)) or any(t in text for t in texts)


def free_memory(device):
    """Return what a try left to the device: collect garbage, empty the allocator's cache, and start CUDA's peak
    count anew (the metrics' peak is training's)."""
    gc.collect()
    if str(device).startswith("cuda"):  # run on H100 and H200
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    elif str(device).startswith("mps"):  # never run (documented in torch.mps)
        torch.mps.empty_cache()


def find_batch_size(try_step, n, free):
    """The first of n, n/2, n/4, ... (each rounded down to a divisor of n, so that equal micro-batches make up
    exactly n) for which try_step(size) does not run out of memory; free() runs between tries, after the except
    block: its traceback holds the failed try's tensors. Returns (size, sizes tried); a UserError if 1 fails."""
    divisors = [d for d in range(n, 0, -1) if n % d == 0]
    size, tried = n, []
    while True:
        tried.append(size)
        try:
            try_step(size)
            return size, tried
        except Exception as e:
            if not out_of_memory(e):
                raise
        free()
        if size == 1:
            raise UserError(
                "batch_size=auto: even a micro-batch of 1 runs out of memory; use a smaller model or "
                "block_size, or activation_checkpointing=true"
            )
        size = next(d for d in divisors if d <= size // 2)


def dry_run(env, model, optimizer, loss_of, T, rows=1):
    """try_step for pick_batch in the PyTorch scripts: forward and backward, an optimizer step, then forward and
    backward again (a step's peak, with the optimizer state in memory) through loss_of(x, y) on rows x size
    sequences of T zero tokens. The learning rate is 0, so the weights stay as they are, and the optimizer state it
    made is cleared after: the model and optimizer must be a new run's. Raises MemoryError past memory_limit."""
    device, limit = env["device"], memory_limit(env["device"])

    def try_step(size):
        if device.startswith("cuda"):  # run on H100 and H200; MPS keeps no peak to reset (runtime.memory_stats)
            torch.cuda.reset_peak_memory_stats(device)
        x = torch.zeros(rows * size, T, dtype=torch.long, device=device)
        lrs = [g["lr"] for g in optimizer.param_groups]
        try:
            for g in optimizer.param_groups:
                g["lr"] = 0.0
            for k in range(2):
                with env["autocast"]:
                    loss = loss_of(x, x)
                loss.backward()
                if k == 0:
                    optimizer.step(local=True)  # each rank tries its own sizes: no collective
                    optimizer.zero_grad(set_to_none=True)
        finally:
            optimizer.zero_grad(set_to_none=True)
            optimizer.state.clear()
            for g, lr in zip(optimizer.param_groups, lrs, strict=True):
                g["lr"] = lr
        peak = memory_stats(device)["peak_mem_gib"] * 2**30
        if peak > limit:
            raise MemoryError(f"peak {peak / 2**30:.2f} GiB is over the {limit / 2**30:.2f} GiB batch_size=auto allows")

    return try_step


def pick_batch(config, env, global_batch, ckpt, try_step, free=None):
    """(batch_size, gradient_accumulation_steps) of the run, written into config and so into every checkpoint.
    batch_size=auto takes the checkpoint's choice on resume, so that its micro-batches go on the same; a new run's
    is find_batch_size's, the smallest over the DDP ranks. gradient_accumulation_steps makes up global_batch."""
    B, world_size = config["batch_size"], env["world_size"]
    n = global_batch // world_size  # sequences per rank and step
    if B == "auto" and ckpt is not None:
        B, how = ckpt["config"]["batch_size"], "the checkpoint's choice"
    elif B == "auto":
        free = free or (lambda: free_memory(env["device"]))
        B, tried = find_batch_size(try_step, n, free)
        free()  # what the last try left
        failed = [s for s in tried if s > B]
        how = f"{', '.join(map(str, failed))} ran out of memory" if failed else "the whole step's share fits"
        how += f"; sizes that divide the {n} per rank" if n & (n - 1) else ""
        if env["ddp"]:
            smallest = torch.tensor(B, device=env["device"])
            dist.all_reduce(smallest, op=dist.ReduceOp.MIN)
            how += f"; {B} fits here but not on every rank" if smallest < B else ""
            B = int(smallest.item())
    if n % B:
        raise UserError(f"batch_size={B} does not divide the {n} sequences per rank of a step; give another")
    accum = global_batch // B
    if config["batch_size"] == "auto" and env["master"]:
        print(
            f"batch_size=auto: {B} ({how}) -> gradient_accumulation_steps={accum} for a global batch of {global_batch}"
        )
    config.update(batch_size=B, gradient_accumulation_steps=accum)
    return B, accum


def parse_schedule(text, block_size):
    """block_size_schedule ("T:share,...", e.g. "1024:0.8,4096:0.2") as [(T, share)], checked: every T divides
    block_size (the model's context, which its RoPE tables cover), so that block_size / T times as many rows of T
    tokens hold a micro-batch's tokens, and the shares add up to 1. "" is [(block_size, 1.0)]."""
    if not text:
        return [(block_size, 1.0)]
    stages = []
    for part in text.split(","):
        T, _, share = part.partition(":")
        try:
            stages.append((int(T), float(share)))
        except ValueError:
            raise UserError(f"block_size_schedule={text}: expected length:share pairs like 1024:0.8,4096:0.2") from None
    for T, share in stages:
        if T < 1 or block_size % T or share <= 0:
            raise UserError(
                f"block_size_schedule={text}: each length must divide block_size={block_size} (the model's context) "
                f"and each share be positive; {T}:{share} is not"
            )
    if abs(sum(share for _, share in stages) - 1) > 1e-6:
        raise UserError(f"block_size_schedule={text}: the shares add up to {sum(s for _, s in stages):g}, not 1")
    return stages


def block_size_at(stages, it, horizon):
    """The sequence length of step it (from 0): each stage of parse_schedule for its share of the first horizon
    steps (lr_decay_iters or max_iters, as the learning-rate schedule), the last one also after them."""
    end = 0.0
    for T, share in stages:
        end += share
        if it < round(end * horizon):
            return T
    return stages[-1][0]
