"""Plumbing shared by the stage scripts: checked config overrides, device/precision/DDP setup, checkpoint
files, metrics logging. Importing it has no side effects; the scripts call what they need in their setup.
"""

import dataclasses
import difflib
import gc
import json
import math
import os
import resource
import shutil
import sys
from contextlib import nullcontext
from pathlib import Path

import safetensors.torch
import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open

from model import GPT, GPTConfig
from muon import Muon
from shards import ShardError


class UserError(Exception):
    """A mistake the user can fix; reported as one `error:` line and a non-zero exit, never a traceback."""


def install_error_handler():
    """Turn UserError / ShardError escaping a script into one clear line on stderr and exit status 2."""

    def hook(kind, value, tb):
        if issubclass(kind, (UserError, ShardError)):
            print(f"error: {value}", file=sys.stderr)
            sys.exit(2)
        sys.__excepthook__(kind, value, tb)

    sys.excepthook = hook


# ----------------------------------------------------------------------------- config


def config_keys(namespace):
    """The overridable globals of a script: public names bound to int, float, bool or str."""
    return [k for k, v in namespace.items() if not k.startswith("_") and isinstance(v, (int, float, bool, str))]


def check_value(key, value, default, auto=()):
    """Return value if it has default's type (an int is accepted for a float), or is "auto" for a key in auto;
    else raise UserError."""
    if key in auto and value == "auto":
        return value
    if key in auto and isinstance(value, str):
        raise UserError(f"{key} must be a {type(default).__name__} or 'auto' (default {default!r}), got {value!r}")
    if isinstance(default, bool) or isinstance(value, bool):
        ok = isinstance(value, bool) and isinstance(default, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float))
        value = float(value) if ok else value
    else:
        ok = type(value) is type(default)
    if not ok:
        raise UserError(f"{key} must be a {type(default).__name__} (default {default!r}), got {value!r}")
    return value


def parse_value(key, text, default, auto=()):
    """Parse a command-line string as the type of default, or "auto" for a key in auto; bools accept only
    true/false."""
    if key in auto and text == "auto":
        return text
    or_auto = " or auto" if key in auto else ""
    try:
        if isinstance(default, bool):
            if text.lower() not in ("true", "false"):
                raise ValueError
            return text.lower() == "true"
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
        return text
    except ValueError:
        raise UserError(f"--{key}={text}: expected a {type(default).__name__} like {default!r}{or_auto}") from None


def unknown_key(key, known, source):
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"; did you mean {close[0]}?" if close else "; run with --help to list the keys"
    return UserError(f"unknown config key {key!r} in {source}{hint}")


def configure(namespace, argv, skip_foreign=False, auto=()):
    """Apply config files (`path.py`, plain assignments) then `--key=value` overrides to a script's globals.

    Every key must already exist in the script and keep its type; the keys in auto may also be "auto" (batch_size,
    in the scripts that search for it). Returns the final config as a dict.
    skip_foreign=True (bench.py) skips a config file's keys the script does not have: a train.py config holds
    run settings (out_dir, max_iters, ...) a benchmark has no use for. The command line stays strict.
    """
    keys = config_keys(namespace)
    defaults = {k: namespace[k] for k in keys}
    config = dict(defaults)
    for arg in argv:
        if arg in ("-h", "--help"):
            print("config keys (default values):")
            for k in keys:
                print(f"  --{k}={defaults[k]}")
            sys.exit(0)
        if not arg.startswith("--"):
            path = Path(arg)
            if not path.is_file():
                raise UserError(f"config file {arg} not found (configs live in config/, overrides are --key=value)")
            values = {}
            try:
                exec(compile(path.read_text(), str(path), "exec"), {}, values)
            except Exception as e:
                raise UserError(f"config file {arg} failed to run: {type(e).__name__}: {e}") from None
            for k, v in values.items():
                if k.startswith("_") or type(v).__name__ == "module":
                    continue
                if k not in defaults and skip_foreign:
                    continue
                if k not in defaults:
                    raise unknown_key(k, keys, arg)
                config[k] = check_value(k, v, defaults[k], auto)
        else:
            key, eq, text = arg[2:].partition("=")
            if key not in defaults:
                raise unknown_key(key, keys, "the command line")
            if not eq and not isinstance(defaults[key], bool):
                raise UserError(f"{arg}: overrides are written --key=value (a bare --flag sets a bool to true)")
            config[key] = parse_value(key, text, defaults[key], auto) if eq else True
    namespace.update(config)
    return config


# ----------------------------------------------------------------------------- device, precision, DDP


def setup_device(device="auto", dtype="auto"):
    """Pick the device (CUDA, then MPS, then CPU unless given), precision and, under torchrun, DDP.

    Returns a dict: device, device_type, ptdtype, autocast (a context manager), ddp, rank, local_rank,
    world_size, master (rank 0 prints and saves).
    """
    ddp = int(os.environ.get("RANK", -1)) != -1
    rank, local_rank, world_size = 0, 0, 1
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if ddp:
        rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
        world_size = int(os.environ["WORLD_SIZE"])
        if device.startswith("cuda"):
            if local_rank >= torch.cuda.device_count():
                raise UserError(
                    f"local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible); "
                    f"set --nproc_per_node to at most the GPU count, or --device=cpu"
                )
            device = f"cuda:{local_rank}"
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    device_type = device.split(":")[0]
    if device_type not in ("cuda", "mps", "cpu"):
        raise UserError(f"device={device}: expected auto, cuda, cuda:N, mps or cpu")
    if dtype == "auto":  # bf16 where the hardware has it; MPS has fp16 only; plain fp32 is fastest on CPU
        dtype = {"cuda": "bfloat16", "mps": "float16", "cpu": "float32"}[device_type]
    ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
    if ptdtype is None:
        raise UserError(f"dtype={dtype}: expected auto, float32, bfloat16 or float16")
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    autocast = nullcontext() if ptdtype == torch.float32 else torch.autocast(device_type, dtype=ptdtype)
    return dict(
        device=device,
        device_type=device_type,
        ptdtype=ptdtype,
        autocast=autocast,
        ddp=ddp,
        rank=rank,
        local_rank=local_rank,
        world_size=world_size,
        master=rank == 0,
    )


# Dense bf16 tensor-core peaks in FLOP/s, for MFU. Matched against torch.cuda.get_device_name().
PEAK_FLOPS = [
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM
    ("H200", 989e12),
    ("H800", 989e12),
    ("A100", 312e12),
    ("A10G", 125e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
]


def peak_flops(device):
    """The device's bf16 peak, or None where unknown (MFU is then not printed)."""
    if not str(device).startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_FLOPS if key in name), None)


def peak_rss_bytes():
    """The process's highest resident set size so far (getrusage: KiB on Linux, bytes on macOS)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def rss_bytes():
    """The process's resident set size now: /proc on Linux, psutil elsewhere (its peak where psutil is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        pass
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:
        return peak_rss_bytes()


def memory_record(mem, peak):
    """The memory fields of a metrics record, in GiB: device memory now (mem_gib) and at its peak (peak_mem_gib),
    given in bytes, and the process's resident set size now (rss_gib)."""
    return {"mem_gib": mem / 2**30, "peak_mem_gib": max(mem, peak) / 2**30, "rss_gib": rss_bytes() / 2**30}


def memory_stats(device):
    """memory_record for a PyTorch device. CUDA: the caching allocator's allocated bytes and their high-water mark
    since the start. MPS has no high-water mark: the peak is the Metal driver's allocation, which keeps the
    allocator's cache, so it stays near the highest use. CPU: the device's memory is the process's, so mem_gib is
    the resident set size and peak_mem_gib its highest so far."""
    device = str(device)
    if device.startswith("cuda"):
        return memory_record(torch.cuda.memory_allocated(device), torch.cuda.max_memory_allocated(device))
    if device.startswith("mps"):
        return memory_record(torch.mps.current_allocated_memory(), torch.mps.driver_allocated_memory())
    return memory_record(rss_bytes(), peak_rss_bytes())


def format_memory(record):
    """The progress line's memory: device memory now/peak, then the process's RSS."""
    return f"mem {record['mem_gib']:.2f}/{record['peak_mem_gib']:.2f}GiB rss {record['rss_gib']:.2f}GiB"


def get_rng_state(device):
    state = {"torch": torch.get_rng_state()}
    if str(device).startswith("cuda"):
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, device):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and str(device).startswith("cuda"):
        torch.cuda.set_rng_state(state["cuda"], device)


# ----------------------------------------------------------------------------- batch size and sequence length

AUTO_HEADROOM = 0.9  # batch_size=auto: a dry run may peak at this share of the device's memory; the rest is for
# what it leaves out (DDP's gradient buckets, the allocator's fragmentation, evaluation)


def memory_limit(device):
    """Bytes a batch_size=auto dry run may peak at, or None on the CPU, where running out of memory cannot be
    caught: the kernel's out-of-memory killer ends the process instead of an error being raised."""
    device = str(device)
    if device.startswith("cuda"):
        return AUTO_HEADROOM * torch.cuda.get_device_properties(device).total_memory
    if device.startswith("mps"):
        return AUTO_HEADROOM * torch.mps.recommended_max_memory()
    return None


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
    """Whether an exception is a device running out of memory (CUDA's and MPS's errors, cuBLAS failing to allocate
    its workspace, MLX's, a dry run's peak past the limit)."""
    text = str(e).lower()
    return isinstance(e, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in text or "alloc_failed" in text


def free_memory(device):
    """Return what a try left to the device: collect garbage, empty the allocator's cache, and start CUDA's peak
    count anew (the metrics' peak is training's)."""
    gc.collect()
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    elif str(device).startswith("mps"):
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
        if device.startswith("cuda"):
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


# ----------------------------------------------------------------------------- optimizer


OPTIMIZERS = ("muon", "adamw")  # the values of the `optimizer` config key


def check_optimizer(optimizer, ckpt=None, out_dir=None):
    """Refuse an unknown `optimizer`, and resuming ckpt (from out_dir) with the other one: Muon keeps a momentum
    buffer per matrix where AdamW keeps two moments, so one's state cannot continue as the other's."""
    if optimizer not in OPTIMIZERS:
        raise UserError(f"optimizer={optimizer}: expected {' or '.join(OPTIMIZERS)}")
    if ckpt is None:
        return
    theirs = ckpt["config"].get("optimizer", "muon")  # checkpoints from before this key were all Muon's
    if theirs != optimizer:
        raise UserError(
            f"the checkpoint in {out_dir} was trained with optimizer={theirs} but the config says "
            f"optimizer={optimizer}; their optimizer states differ, so resume with --optimizer={theirs}"
        )


def make_optimizer(model, muon_lr, muon_momentum, learning_rate, betas, weight_decay, optimizer="muon"):
    """optimizer="muon": Muon for the attention and MLP matrices, AdamW for the embedding (= output head) and the
    norm gains. optimizer="adamw": AdamW at learning_rate for all of them (muon_lr, muon_momentum unused), still
    in muon.Muon's three groups, so checkpoints and train_mlx.py's mirror are the same code. Norm gains never
    decay. Each group remembers its peak learning rate for the schedule."""
    check_optimizer(optimizer)
    matrices = [p for n, p in model.named_parameters() if p.ndim == 2 and "wte" not in n]
    adamw = dict(use_muon=False, lr=learning_rate, betas=betas)
    hidden = dict(use_muon=True, lr=muon_lr, momentum=muon_momentum) if optimizer == "muon" else adamw
    muon = Muon(
        [
            dict(params=matrices, weight_decay=weight_decay, **hidden),
            dict(params=[model.transformer.wte.weight], weight_decay=weight_decay, **adamw),
            dict(params=[p for p in model.parameters() if p.ndim < 2], weight_decay=0.0, **adamw),
        ]
    )
    for group in muon.param_groups:
        group["peak_lr"] = group["lr"]
    return muon


def load_optimizer_state(optimizer, state):
    """Restore the optimizer's state but keep the hyperparameters the config gave it (a resume may change them)."""
    hyper = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, h in zip(optimizer.param_groups, hyper, strict=True):
        group.update(h)


def check_finite(loss, what, step, out_dir):
    """Stop on a NaN/inf loss before anything is saved, so the last checkpoint stays a good one."""
    if not math.isfinite(loss):
        raise UserError(
            f"{what} is {loss} at step {step}; the last good checkpoint in {out_dir} is untouched. "
            f"Lower muon_lr/learning_rate or raise warmup_iters, then --init_from=resume"
        )


class EarlyStopping:
    """Stop a run once its validation loss has not beaten the best checkpoint's for `patience` evaluations in a row
    (0 = never). best is the lowest validation loss of a saved checkpoint, as without it; with patience on, every
    evaluation that beats it is saved too (must_save), so ckpt_best holds the lowest of them all. Every rank keeps
    the count (the validation loss is averaged over ranks), so all stop together; state() goes into each checkpoint
    and a resumed run counts on from it."""

    def __init__(self, patience, best=math.inf, state=None):
        self.patience, self.best = patience, best
        self.bad_evals, self.best_step = (state or {}).get("bad_evals", 0), (state or {}).get("best_step", 0)
        self.improved = False  # the last evaluation beat best and no checkpoint holds it yet

    def evaluated(self, val_loss):
        """Count an evaluation during training (step 0's is not one: no checkpoint holds it)."""
        self.improved = val_loss < self.best
        self.bad_evals = 0 if self.improved else self.bad_evals + 1

    @property
    def stop(self):
        return 0 < self.patience <= self.bad_evals

    @property
    def must_save(self):
        """Save now, whatever ckpt_interval says: to keep a new best, or the state the run stops in."""
        return self.patience > 0 and (self.improved or self.stop)

    def saved(self, step, val_loss):
        """A checkpoint of val_loss is written at step: whether it is the best so far (then copied to ckpt_best)."""
        is_best = val_loss < self.best
        if is_best:
            self.best, self.best_step = val_loss, step
        self.improved = False
        return is_best

    def state(self):
        return {"bad_evals": self.bad_evals, "best_step": self.best_step}

    def record(self, step):
        """The metrics record, and the line printed, when the run stops early."""
        line = (
            f"early stop at step {step}: validation loss {self.best:.4f} (step {self.best_step}) not beaten in "
            f"{self.bad_evals} evaluations (patience={self.patience}); {BEST} holds step {self.best_step}"
        )
        return {"step": step, "early_stop": True, "best_val_loss": self.best, "best_step": self.best_step}, line


# ----------------------------------------------------------------------------- checkpoints
# A checkpoint is one safetensors file: every tensor of the nested state dict (weights, optimizer moments, RNG
# and data-generator states) under its path ("model/transformer.wte.weight", "optimizer/state/0/exp_avg"), and
# the rest of the dict (numbers, strings, the config) as JSON in the file's metadata, each tensor replaced by
# its name. Loading runs no pickled code, and MLX or any safetensors reader sees the weights by name.

CKPT_GLOB = "ckpt_[0-9]*.safetensors"
BEST = "ckpt_best.safetensors"
FORMAT = "anarchobot-checkpoint-1"  # metadata["format"]: what load_checkpoint accepts


def step_checkpoints(out_dir):
    """Step checkpoints in out_dir, oldest first."""
    return sorted(Path(out_dir).glob(CKPT_GLOB))


def flatten_state(obj, prefix, tensors, seen):
    """obj with every tensor replaced by {"tensor": name}, the tensors collected in `tensors`. A tensor met
    twice (the tied wte/lm_head weight) is stored once and named twice: safetensors refuses shared memory."""
    if isinstance(obj, torch.Tensor):
        key = (obj.untyped_storage().data_ptr(), obj.storage_offset(), obj.shape, obj.stride(), obj.dtype)
        if key not in seen or obj.numel() == 0:
            seen[key] = prefix.rstrip("/")
            tensors[seen[key]] = obj.detach().cpu().contiguous()
        return {"tensor": seen[key]}
    if isinstance(obj, dict):  # JSON keys are strings: keep each key's type (optimizer state uses int keys)
        items = [[k, flatten_state(v, f"{prefix}{k}/", tensors, seen)] for k, v in obj.items()]
        if all(isinstance(k, str) for k in obj):
            return {"dict": dict(items)}
        return {"items": items}
    if isinstance(obj, (list, tuple)):
        return {type(obj).__name__: [flatten_state(v, f"{prefix}{i}/", tensors, seen) for i, v in enumerate(obj)]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return {"value": obj}
    raise TypeError(f"cannot store a {type(obj).__name__} at {prefix} in a checkpoint")


def unflatten_state(node, tensors):
    """The inverse of flatten_state."""
    ((kind, body),) = node.items()
    if kind == "tensor":
        return tensors[body]
    if kind == "dict":
        return {k: unflatten_state(v, tensors) for k, v in body.items()}
    if kind == "items":
        return {k: unflatten_state(v, tensors) for k, v in body}
    if kind in ("list", "tuple"):
        values = [unflatten_state(v, tensors) for v in body]
        return values if kind == "list" else tuple(values)
    return body


def atomic_save(state, path):
    """Write a checkpoint to a temporary file, fsync, then rename: a crash leaves the old file or the new one."""
    tensors = {}
    structure = flatten_state(state, "", tensors, {})
    data = safetensors.torch.save(tensors, metadata={"format": FORMAT, "structure": json.dumps(structure)})
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(out_dir, step, state, keep_last, is_best):
    """Write ckpt_<step>.safetensors, copy it to ckpt_best.safetensors when is_best, keep the last keep_last."""
    path = Path(out_dir) / f"ckpt_{step:07d}.safetensors"
    atomic_save(state, path)
    if is_best:
        tmp = Path(out_dir) / f"{BEST}.tmp"
        shutil.copyfile(path, tmp)
        os.replace(tmp, Path(out_dir) / BEST)
    for old in step_checkpoints(out_dir)[:-keep_last]:
        old.unlink()
    return path


ARCH_KEYS = ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "mlp_hidden", "rope_theta")  # GPTConfig's


def open_run(out_dir, init_from, overwrite, config, tokenizer_path, master=True):
    """The run folder of train.py / train_mlx.py: returns (checkpoint to resume or None, model args from config).
    A resume must have the checkpoint's architecture and optimizer; a new run refuses a folder that holds one unless
    overwrite, and then clears what the old run left. The tokenizer is copied in: sample.py reads it from the run
    folder."""
    model_args = {k: config[k] for k in ARCH_KEYS}
    out, ckpt = Path(out_dir), None
    if init_from == "resume":
        ckpt = load_checkpoint(find_checkpoint(out_dir, "latest"))
        for k, v in model_args.items():
            if ckpt["model_args"].get(k) != v:
                raise UserError(
                    f"the checkpoint in {out_dir} has {k}={ckpt['model_args'].get(k)} but the config "
                    f"says {k}={v}; resume with the run's own config"
                )
        if ckpt["config"].get("arch", "gpt") != config.get("arch", "gpt"):  # train.py's peer (peer.py) or ours
            raise UserError(
                f"{out_dir} holds an arch={ckpt['config'].get('arch', 'gpt')} run; resume it with that --arch"
            )
    elif step_checkpoints(out) and not overwrite:
        raise UserError(f"{out_dir} already holds a run; use --init_from=resume, --overwrite=true or another --out_dir")
    check_optimizer(config["optimizer"], ckpt, out_dir)
    if master:
        if init_from == "scratch":
            for old in [*step_checkpoints(out), out / BEST, out / "metrics.jsonl"]:
                old.unlink(missing_ok=True)
            shutil.rmtree(out / "tb", ignore_errors=True)
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tokenizer_path, out / Path(tokenizer_path).name)
    return ckpt, model_args


def find_checkpoint(out_dir, which="latest", flag="--out_dir"):
    """Path of the checkpoint to load: `latest`, `best` (falls back to latest) or a file name in out_dir. `flag` is
    where the user gave out_dir (--out_dir, or --init_from for sft.py and dpo.py), for the error messages."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise UserError(f"run folder {out_dir} does not exist; check {flag}")
    if which == "best" and (out_dir / BEST).exists():
        return out_dir / BEST
    if which in ("best", "latest"):
        steps = step_checkpoints(out_dir)
        if not steps and list(out_dir.glob("ckpt_[0-9]*.pt")):  # written by torch.save before safetensors
            raise UserError(
                f'{out_dir} holds only ckpt_*.pt files of the old format; convert one with python -c "import '
                f"runtime, torch; runtime.atomic_save(torch.load('OLD.pt', weights_only=True), 'NEW.safetensors')\""
            )
        if not steps:
            raise UserError(f"no checkpoint (ckpt_*.safetensors) in {out_dir}; check {flag}, or train one there first")
        return steps[-1]
    if not (out_dir / which).is_file():
        raise UserError(f"checkpoint {out_dir / which} not found; check --ckpt (best, latest or a file in {out_dir})")
    return out_dir / which


def load_checkpoint(path):
    """Load a checkpoint to CPU memory without unpickling code; refuse anything not ours.
    (CPU first: RNG states must be CPU tensors, and load_state_dict copies weights to the model's device.)"""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise UserError(
            f"checkpoint {path} is truncated or corrupted ({type(e).__name__}); "
            f"delete it to fall back to an older one, or retrain"
        ) from None
    if metadata.get("format") != FORMAT:
        raise UserError(f"{path} is not an AnarchoBot checkpoint (a safetensors file without our metadata)")
    try:
        ckpt = unflatten_state(json.loads(metadata["structure"]), tensors)
    except (KeyError, ValueError) as e:  # metadata that names a missing tensor or is not our JSON
        raise UserError(f"checkpoint {path} is corrupted ({type(e).__name__} in its structure); retrain") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_args" not in ckpt:
        raise UserError(f"{path} is not an AnarchoBot checkpoint (no model/model_args entries)")
    return ckpt


def load_model_state(model, state, path):
    """load_state_dict(strict=True) with a one-line error when the checkpoint's architecture differs."""
    ours = model.state_dict()
    missing = [k for k in ours if k not in state]
    extra = [k for k in state if k not in ours]
    shapes = [k for k in ours if k in state and state[k].shape != ours[k].shape]
    if missing or extra or shapes:
        detail = (
            (missing and f"missing {missing[0]}")
            or (extra and f"unexpected {extra[0]}")
            or (f"{shapes[0]} is {tuple(state[shapes[0]].shape)}, model has {tuple(ours[shapes[0]].shape)}")
        )
        raise UserError(f"{path} holds another architecture ({detail}); load it with the config it was trained with")
    model.load_state_dict(state, strict=True)


def build_model(ckpt, path):
    """The GPT a checkpoint describes, with its weights; a UserError if it is not one of ours."""
    unknown = set(ckpt["model_args"]) - {f.name for f in dataclasses.fields(GPTConfig)}
    if unknown:
        raise UserError(
            f"{path} holds another architecture (model_args has {sorted(unknown)[0]!r}); "
            f"it was not written by this project's train.py"
        )
    if ckpt.get("config", {}).get("arch", "gpt") != "gpt":
        raise UserError(
            f"{path} is a run of the nanoGPT peer (train.py --arch={ckpt['config']['arch']}), kept for its loss "
            f"curve; compare it with: python eval.py --out_dir=RUN --compare={Path(path).parent} --tasks=curves"
        )
    model = GPT(GPTConfig(**ckpt["model_args"]))
    load_model_state(model, ckpt["model"], path)
    return model


# ----------------------------------------------------------------------------- logging


class MetricsLog:
    """Appends one JSON object per line to out_dir/metrics.jsonl, and mirrors scalars to TensorBoard when the
    tensorboard package is installed."""

    def __init__(self, out_dir, enabled=True):
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        self.file = open(Path(out_dir) / "metrics.jsonl", "a")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(out_dir) / "tb"))
        except ImportError:
            pass

    def log(self, record):
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, record["step"])

    def close(self):
        if self.enabled:
            self.file.close()
            if self.tb is not None:
                self.tb.close()


def format_duration(seconds):
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"
