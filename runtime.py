"""Plumbing shared by the stage scripts: checked config overrides, device/precision/DDP setup, memory readings,
the optimizer, metrics logging (checkpoint files are in checkpoints.py, batch sizes in batching.py). Importing it
has no side effects; the scripts call what they need in their setup.
"""

import difflib
import json
import math
import os
import resource
import sys
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

import backends
import disk
from accepts import Accepts, show
from muon import Muon
from shards import ShardError


class UserError(Exception):
    """A mistake the user can fix; reported as one `error:` line and a non-zero exit, never a traceback."""


def install_error_handler():
    """Turn UserError / ShardError escaping a script into one clear line on stderr and exit status 2; so too running
    out of memory (settings too large for this machine: the fuzz test met num_samples=1000000 in sample.py)."""

    def hook(kind, value, tb):
        if issubclass(kind, (UserError, ShardError)):
            print(f"error: {value}", file=sys.stderr)
            sys.exit(2)
        if issubclass(kind, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in str(value):
            print(f"error: out of memory ({str(value).splitlines()[0][:160]}); lower the sizes given", file=sys.stderr)
            sys.exit(2)
        sys.__excepthook__(kind, value, tb)

    sys.excepthook = hook


# ----------------------------------------------------------------------------- config


def config_keys(namespace):
    """The overridable globals of a script: public lower-case names bound to int, float, bool or str (an upper-case
    name is a constant, often imported: sample.py's END is chat.py's end-of-turn marker, not a setting)."""
    return [
        k
        for k, v in namespace.items()
        if not k.startswith("_") and not k.isupper() and isinstance(v, (int, float, bool, str))
    ]


def check_value(key, value, kind, default, auto=()):
    """Return value if it is of type kind (an int is accepted for a float), or is "auto" for a key in auto; else
    raise UserError."""
    if key in auto and value == "auto":
        return value
    if key in auto and isinstance(value, str):
        raise UserError(f"{key} must be a {kind.__name__} or 'auto' (default {default!r}), got {value!r}")
    if kind is bool or isinstance(value, bool):
        ok = isinstance(value, bool) and kind is bool
    elif kind is float:
        ok = isinstance(value, float) or (isinstance(value, int) and abs(value) < 2**1023)  # float() of more overflows
        value = float(value) if ok else value
    else:
        ok = type(value) is kind
    if not ok:
        raise UserError(f"{key} must be a {kind.__name__} (default {default!r}), got {value!r}")
    return value


def parse_value(key, text, kind, default, auto=()):
    """Parse a command-line string as a kind (int, float, bool or str), or "auto" for a key in auto; bools accept
    only true/false."""
    if key in auto and text == "auto":
        return text
    try:
        if kind is bool:
            if text.lower() not in ("true", "false"):
                raise ValueError
            return text.lower() == "true"
        return kind(text)
    except ValueError:
        like = "" if default == "auto" else f" like {default!r}"
        or_auto = " or auto" if key in auto else ""
        raise UserError(f"--{key}={text}: expected a {kind.__name__}{like}{or_auto}") from None


def unknown_key(key, known, source):
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"; did you mean {close[0]}?" if close else "; run with --help to list the keys"
    return UserError(f"unknown config key {key!r} in {source}{hint}")


def declarations(namespace, keys):
    """What each key accepts: the annotations of the script's globals (accepts.py), for the keys that have one."""
    notes = namespace.get("__annotations__", {})
    return {k: notes[k] for k in keys if isinstance(notes.get(k), Accepts)}


def configure(namespace, argv, skip_foreign=False, auto=(), rules=()):
    """Apply config files (`path.py`, plain assignments) then `--key=value` overrides to a script's globals.

    Every key must already exist in the script and keep its type; the keys in auto, or whose declaration takes the
    literal "auto", may also be "auto" (batch_size, in the scripts that search for it). Then every final value is
    checked against its key's declaration (accepts.py), and rules, the relations between keys: (test(c), message)
    pairs or functions of c that raise UserError; c holds the config as attributes and world_size (torchrun's, else
    1), and the message is formatted with them.
    Returns the final config as a dict.
    skip_foreign=True (bench.py) skips a config file's keys the script does not have: a train.py config holds
    run settings (out_dir, max_iters, ...) a benchmark has no use for. The command line stays strict.
    """
    keys = config_keys(namespace)
    defaults = {k: namespace[k] for k in keys}
    accepts = declarations(namespace, keys)

    def kind(k, v):
        """The type key k keeps: the one its declaration states (compile: auto | bool; near_dup: auto | 0.0 | float &
        between(0.5, 0.95)), else its default's; a default of "auto" with no type stated is text (dtype: auto |
        float32 ...). Never guessed from the declaration's numbers: `auto | between(0.5, 0.95)` would be text."""
        a = accepts.get(k)
        stated = a.kind if a else None
        takes_more = a and (a.edges or any(not isinstance(x, str) for x in a.literals))
        if v == "auto" and not stated and takes_more:  # the script's own mistake: a traceback, for its author
            raise TypeError(f"{k} defaults to auto and takes more than text: state its type (auto | float & ...)")
        if stated and v != "auto" and type(v) is not stated and not (stated is float and type(v) is int):
            raise TypeError(f"{k}: its default {v!r} is not of the type its declaration states, {stated.__name__}")
        return stated or type(v)

    kinds = {k: kind(k, v) for k, v in defaults.items()}
    auto = (*auto, *(k for k, a in accepts.items() if "auto" in a.literals and kinds[k] is not str))
    config = dict(defaults)
    for arg in argv:
        if arg in ("-h", "--help"):
            print("config keys (default values):")
            for k in keys:
                print(f"  --{k}={defaults[k]}" + (f"  (takes {accepts[k].what})" if k in accepts else ""))
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
                config[k] = check_value(k, v, kinds[k], defaults[k], auto)
        else:
            key, eq, text = arg[2:].partition("=")
            if key not in defaults:
                raise unknown_key(key, keys, "the command line")
            if not eq and kinds[key] is not bool:
                raise UserError(f"{arg}: overrides are written --key=value (a bare --flag sets a bool to true)")
            config[key] = parse_value(key, text, kinds[key], defaults[key], auto) if eq else True
    check_config(config, accepts, rules)
    namespace.update(config)
    return config


def check_config(config, accepts, rules):
    """Each value against its key's declaration, then the rules relating keys (see configure); a UserError names
    the first that fails, with what it got and what it takes."""
    for k, a in accepts.items():
        if not a(config[k]):
            v = config[k]
            missing = isinstance(v, str) and ("folder" in a.what or "file" in a.what) and not os.path.lexists(v)
            raise UserError(f"{k}={show(v)}: expected {a.what}" + ("; it does not exist" if missing else ""))
    c = SimpleNamespace(**config, world_size=int(os.environ.get("WORLD_SIZE", 1)))
    for rule in rules:  # (test, message), or a function that raises UserError itself (batching.parse_schedule)
        test, message = rule if isinstance(rule, tuple) else (rule, None)
        if not test(c) and message is not None:
            raise UserError(message.format(**vars(c)))


# ----------------------------------------------------------------------------- device, precision, DDP


def setup_device(device="auto", dtype="auto", compile=False, ns_dtype="auto"):
    """Pick the device (CUDA, then MPS, then CPU unless given), precision and, under torchrun, DDP. What each device
    type gets where a key says auto (dtype, compile, ns_dtype) is backends.device_defaults', and so is what is refused.

    Returns a dict: device, device_type, ptdtype, autocast (a context manager), compile (a bool), ns_dtype (Muon's
    Newton-Schulz precision, a dtype's name), defaults (backends.device_defaults'), ddp, rank, local_rank,
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
    defaults = backends.device_defaults(device_type, torch.__version__)
    dtype = defaults["dtype"] if dtype == "auto" else dtype
    ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
    if ptdtype is None:
        raise UserError(f"dtype={dtype}: expected auto, float32, bfloat16 or float16")
    if dtype not in defaults["dtypes"]:
        raise UserError(
            f"dtype={dtype} on {device_type} with torch {torch.__version__}: expected auto or "
            f"{' or '.join(defaults['dtypes'])} (docs/backends.md says why)"
        )
    ns_dtype = defaults["ns_dtype"] if ns_dtype == "auto" else ns_dtype
    if ns_dtype not in ("float32", "bfloat16"):
        raise UserError(f"ns_dtype={ns_dtype}: expected auto, float32 or bfloat16")
    if compile == "auto":
        compile = defaults["compile"]
    elif compile and defaults["compile_refused"]:
        raise UserError(f"compile=true on {device_type}: {defaults['compile_refused']}; use compile=auto (off there)")
    elif compile and defaults["compile_note"] and rank == 0:
        print(defaults["compile_note"])
    if defaults["tf32"]:  # run on CUDA (H100, H200)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    autocast = nullcontext() if ptdtype == torch.float32 else torch.autocast(device_type, dtype=ptdtype)
    return dict(
        device=device,
        device_type=device_type,
        ptdtype=ptdtype,
        autocast=autocast,
        compile=compile,
        ns_dtype=ns_dtype,
        defaults=defaults,
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


def end_distributed():
    """Leave the process group together: a barrier first, so that no rank tears gloo down while a peer still
    writes a checkpoint (a rank that did aborted at exit, SIGABRT, about one run in four on 2 CPU ranks).

    On gloo the barrier is monitored_barrier, whose messages are sent and waited for in this thread. dist.barrier's
    work is let go by one of gloo's worker threads, which needs the GIL to free the work's tensor; when the
    interpreter had begun to shut down by then, that thread ended the process ("terminate called without an active
    exception", SIGABRT: 3 runs in 60 of a 2-rank train.py on 2 busy CPU cores; the core dump's stack
    ProcessGroupGloo::runLoop -> ~AsyncBarrierWork -> decref_pyobject -> take_gil -> pthread_exit). Nor does
    destroy_process_group end those threads while DDP still holds the group."""
    if dist.get_backend() == "gloo":
        dist.monitored_barrier()
    else:
        dist.barrier()
    dist.destroy_process_group()


def peak_flops(device):
    """The device's bf16 peak, or None where unknown (MFU is then not printed)."""
    if not str(device).startswith("cuda"):  # run on H100, H200 and the CPU (no peak there, nor on MPS)
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_FLOPS if key in name), None)


def cores():
    """The CPU cores this process may use: its affinity where the system says it (a container's or taskset's share;
    os.cpu_count() is the host's), else every core."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


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
    if device.startswith("cuda"):  # run on H100 and H200
        return memory_record(torch.cuda.memory_allocated(device), torch.cuda.max_memory_allocated(device))
    if device.startswith("mps"):  # never run: torch.mps's documented readings (tested with them faked)
        return memory_record(torch.mps.current_allocated_memory(), torch.mps.driver_allocated_memory())
    return memory_record(rss_bytes(), peak_rss_bytes())  # run on x86 CPUs (Linux)


def format_memory(record):
    """The progress line's memory: device memory now/peak, then the process's RSS."""
    return f"mem {record['mem_gib']:.2f}/{record['peak_mem_gib']:.2f}GiB rss {record['rss_gib']:.2f}GiB"


def get_rng_state(device):
    state = {"torch": torch.get_rng_state()}
    # run on CUDA and the CPU. MPS (never run) draws nothing from its own generator in training: the weights are made
    # on the CPU and the data order is the shard reader's, so the CPU's state resumes a run exactly there too
    if str(device).startswith("cuda"):
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, device):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and str(device).startswith("cuda"):
        torch.cuda.set_rng_state(state["cuda"], device)


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


def make_optimizer(
    model,
    muon_lr,
    muon_momentum,
    learning_rate,
    betas,
    weight_decay,
    optimizer="muon",
    ns_dtype=None,
    muon_weight_decay="auto",
    cautious_wd=False,
):
    """optimizer="muon": Muon for the attention and MLP matrices, AdamW for the embeddings (wte = the output head,
    value_embeds), the norm gains, scalars and value-embedding gates. optimizer="adamw": AdamW at learning_rate for
    all of them (muon_lr, muon_momentum, muon_weight_decay unused), still in muon.Muon's three groups, so checkpoints
    and train_mlx.py's mirror are the same code. The matrices decay at muon_weight_decay with optimizer="muon" (auto:
    weight_decay), else at weight_decay; the embeddings at weight_decay; norm gains, scalars and gates never decay.
    cautious_wd: every decaying group decays cautiously (muon.py). Each group remembers its peak learning rate for
    the schedule. ns_dtype: the Newton-Schulz precision of the Muon group ("float32", "bfloat16": setup_device's
    env["ns_dtype"]); None leaves muon.NS_DTYPE."""
    check_optimizer(optimizer)
    # embeddings (wte, value_embeds) and the value embeddings' tiny gates are AdamW's (as nanochat's), not Muon's
    named = [(n, p) for n, p in model.named_parameters() if p.ndim == 2]
    embeddings = [p for n, p in named if "wte" in n or "value_embeds" in n]
    gates = [p for n, p in named if n.endswith("ve_gate")]
    matrices = [p for n, p in named if not ("wte" in n or "value_embeds" in n or n.endswith("ve_gate"))]
    adamw = dict(use_muon=False, lr=learning_rate, betas=betas, cautious_wd=cautious_wd)
    hidden = dict(use_muon=True, lr=muon_lr, momentum=muon_momentum, cautious_wd=cautious_wd)
    hidden_decay = weight_decay
    if optimizer == "muon":
        hidden_decay = weight_decay if muon_weight_decay == "auto" else muon_weight_decay
        if ns_dtype:
            hidden["ns_dtype"] = ns_dtype
    else:
        hidden = adamw
    muon = Muon(
        [
            dict(params=matrices, weight_decay=hidden_decay, **hidden),
            dict(params=embeddings, weight_decay=weight_decay, **adamw),
            dict(params=[p for p in model.parameters() if p.ndim < 2] + gates, weight_decay=0.0, **adamw),
        ]
    )
    for group in muon.param_groups:
        group["peak_lr"] = group["lr"]
    return muon


def fine_tuning_lrs(base_config, lr_frac, resume, path):
    """(muon_lr, learning_rate) of an SFT or DPO run: lr_frac of the peak rates in the config of the run it starts
    from, or, on resume, the run's own (stored in its checkpoint's config when it started). lr_frac's range is its
    key's declaration, checked by configure."""
    missing = [k for k in ("muon_lr", "learning_rate") if not isinstance(base_config.get(k), (int, float))]
    if missing:
        raise UserError(f"{path} records no {missing[0]} in its config, so lr_frac has nothing to scale; retrain it")
    scale = 1.0 if resume else lr_frac
    return scale * base_config["muon_lr"], scale * base_config["learning_rate"]


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


# ----------------------------------------------------------------------------- logging


class MetricsLog:
    """Appends one JSON object per line to out_dir/metrics.jsonl (whole lines only: disk.append), and mirrors scalars
    to TensorBoard when the tensorboard package is installed."""

    def __init__(self, out_dir, enabled=True):
        self.enabled, self.path = enabled, Path(out_dir) / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(out_dir) / "tb"))
        except ImportError:
            pass

    def log(self, record):
        if not self.enabled:
            return
        disk.append(self.path, (json.dumps(record) + "\n").encode(), disk.RESUME)
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, record["step"])

    def close(self):
        if self.enabled and self.tb is not None:
            self.tb.close()


def format_duration(seconds):
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"
