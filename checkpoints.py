"""Checkpoint files, run folders and early stopping (which decides when ckpt_best is written), for every stage
script.

A checkpoint is one safetensors file: every tensor of the nested state dict (weights, optimizer moments, RNG
and data-generator states) under its path ("model/transformer.wte.weight", "optimizer/state/0/exp_avg"), and
the rest of the dict (numbers, strings, the config) as JSON in the file's metadata, each tensor replaced by
its name. Loading runs no pickled code, and MLX or any safetensors reader sees the weights by name.
"""

import dataclasses
import json
import math
import shutil
import struct
import threading
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

import disk
from model import GPT, GPTConfig
from runtime import UserError, check_optimizer

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
            tensors[seen[key]] = obj.detach().to("cpu", copy=True).contiguous()  # a copy: training goes on
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


# safetensors' names of the dtypes a checkpoint holds
DTYPES = {
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def encode(state):
    """The checkpoint of state as the pieces of a safetensors file: its 8-byte header size, the JSON header (each
    tensor's dtype, shape and byte range, the structure in the metadata), then each tensor's bytes, in host memory.
    Written here, not by safetensors.torch.save: that builds one bytes object of the whole file and holds the GIL
    while it does, which stalled the training thread beside a background save (a pure-Python thread kept 48% of
    its speed against 97% with these pieces, on a 2-core Intel Xeon with AMX and avx512_bf16). safetensors reads the
    file as its own."""
    tensors = {}
    structure = flatten_state(state, "", tensors, {})
    header, data, offset = {"__metadata__": {"format": FORMAT, "structure": json.dumps(structure)}}, [], 0
    for name, t in tensors.items():
        if t.dtype not in DTYPES:
            raise TypeError(f"cannot store a {t.dtype} tensor ({name}) in a checkpoint")
        raw = t.reshape(-1).view(torch.uint8).numpy()  # bf16 has no numpy dtype: its bytes
        header[name] = {"dtype": DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + raw.nbytes]}
        data.append(memoryview(raw))
        offset += raw.nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned
    return [struct.pack("<Q", len(head)), head, *data]


def atomic_save(state, path, then="run the same command again"):
    """Write a checkpoint to a temporary file, fsync, then rename: a crash leaves the old file or the new one, and a
    full disk one error line (disk.write_atomic) with `then` as its advice."""
    disk.write_atomic(path, encode(state), then)


def write_checkpoint(out_dir, step, pieces, keep_last, is_best):
    """Write encode()'s pieces as ckpt_<step>.safetensors, make ckpt_best.safetensors the same file (a hard link, or
    a copy where the file system has none) when is_best, keep the last keep_last. Rotation removes only the step
    checkpoint's name: the best's data lives on through its own link. A save that cannot make ckpt_best removes its
    step checkpoint too, which records it as the best: the run resumes from the one before and saves both again."""
    path = Path(out_dir) / f"ckpt_{step:07d}.safetensors"
    disk.write_atomic(path, pieces, disk.RESUME)
    if is_best:
        try:
            disk.link_or_copy(path, Path(out_dir) / BEST, disk.RESUME)
        except BaseException:
            path.unlink()
            raise
    for old in step_checkpoints(out_dir)[:-keep_last]:
        old.unlink()
    return path


def save_checkpoint(out_dir, step, state, keep_last, is_best):
    """write_checkpoint of state, now (the trainers save through a Saver, in the background)."""
    return write_checkpoint(out_dir, step, encode(state), keep_last, is_best)


class Saver:
    """Checkpoints written behind training. save() copies the state to host memory (encode: a fraction of a second
    for the reference model on a GPU), then a thread writes, fsyncs, links ckpt_best and rotates while the next
    steps run: on one H200 each synchronous save of the 1.6 GB checkpoint left the GPU idle ~4 s (PERF.md). One
    checkpoint at a time: a save waits for the one before. A failed write (a full disk) is raised in the training
    loop by check() at the next step, or by the next save or finish(); the checkpoints before it stay whole. The
    thread is no daemon: a run stopped by Ctrl-C finishes the checkpoint in flight before the process ends."""

    def __init__(self):
        self.thread, self.error = None, None

    def save(self, out_dir, step, state, keep_last, is_best):
        """Write state's checkpoint in the background; "saved <path>" is printed once it is on disk."""
        self.finish()
        pieces = encode(state)

        def write():
            try:
                path = write_checkpoint(out_dir, step, pieces, keep_last, is_best)
                print(f"saved {path}" + (" (best so far)" if is_best else "") + "\n", end="", flush=True)  # one write
            except BaseException as e:  # raised in the training loop, by check()
                self.error = e

        self.thread = threading.Thread(target=write, name=f"checkpoint {step}")
        self.thread.start()

    def check(self):
        """Raise the error of a failed background write, if any."""
        if self.error is not None:
            error, self.error = self.error, None
            raise error

    def finish(self):
        """Wait for the checkpoint in flight, then raise its error, if any."""
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        self.check()


# the model's features of issue 37, off by default (GPTConfig's fields; train.py's and train_mlx.py's keys)
FEATURE_KEYS = (
    "qk_norm",
    "attn_scale",
    "zero_init",
    "logit_softcap",
    "value_embeds",
    "x0_shortcut",
    "value_residual",
    "embed_norm",
)
ARCH_KEYS = ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "mlp_hidden", "rope_theta", *FEATURE_KEYS)


def checkpoint_bytes(model, optimizer):
    """The size of a checkpoint of model and optimizer (muon.Muon in runtime.make_optimizer's groups), before the
    optimizer has made its state: the weights (a tied tensor once), Muon's momentum per matrix or AdamW's two
    moments and step per parameter, and the rest: the metadata (the structure's JSON and the safetensors header,
    under 1.2 kB a tensor; the config), the RNG and data states (10 kB). A little above the file's size."""
    tensors = {}
    flatten_state(model.state_dict(), "", tensors, {})
    total = sum(t.nbytes for t in tensors.values())
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p)
            if state:  # a resumed run's
                total += sum(t.nbytes for t in state.values() if isinstance(t, torch.Tensor))
            else:
                total += p.nbytes if group["use_muon"] else 2 * p.nbytes + 4
    return total + 1200 * (len(tensors) + sum(len(g["params"]) for g in optimizer.param_groups)) + 32_000


def check_space(out_dir, model, optimizer, keep_last):
    """Before step 0: refuse a run folder whose disk cannot hold keep_last + 1 checkpoints (the kept ones and the
    one being written, before rotation removes the oldest), and warn when it holds no more: ckpt_best takes one
    more once the best falls out of the kept ones (a validation loss that rises). Checkpoints already in out_dir
    (a resumed run's) count as room, but the next save needs one checkpoint's space free in any case."""
    size = checkpoint_bytes(model, optimizer)
    files = {
        (s.st_dev, s.st_ino): s.st_size
        for p in [*step_checkpoints(out_dir), Path(out_dir) / BEST]
        if p.exists()
        for s in [p.stat()]
    }
    held, free = sum(files.values()), disk.free_bytes(out_dir)
    need, worst = (max(size, (n + 1) * size - held) for n in (keep_last, keep_last + 1))
    if free < need:
        fit = (free + held) // size - 1  # the keep_last that fits
        lower = f"--keep_last={fit}, " if fit >= 1 and free >= size else ""
        raise UserError(
            f"{out_dir} has {disk.size_text(free)} free, but its checkpoints need {disk.size_text(need)} more: "
            f"keep_last={keep_last} + 1 of {disk.size_text(size)} each; free space there, or use {lower}"
            f"another --out_dir"
        )
    if free < worst:
        print(
            f"warning: {out_dir} has {disk.size_text(free)} free, room for keep_last={keep_last} + 1 checkpoints of "
            f"{disk.size_text(size)} but not for ckpt_best besides (once the best is no longer a kept one); a full "
            f"disk would stop the run with its checkpoints intact"
        )


def open_run(out_dir, init_from, overwrite, config, tokenizer_path, master=True):
    """The run folder of train.py / train_mlx.py: returns (checkpoint to resume or None, model args from config).
    A resume must have the checkpoint's architecture and optimizer; a new run refuses a folder that holds one unless
    overwrite, and then clears what the old run left. The tokenizer is copied in: sample.py reads it from the run
    folder."""
    model_args = {k: config[k] for k in ARCH_KEYS}
    out, ckpt = Path(out_dir), None
    if init_from == "resume":
        ckpt = load_checkpoint(find_checkpoint(out_dir, "latest"))
        defaults = {f.name: f.default for f in dataclasses.fields(GPTConfig)}  # an older checkpoint's features: off
        for k, v in model_args.items():
            if ckpt["model_args"].get(k, defaults[k]) != v:
                raise UserError(
                    f"the checkpoint in {out_dir} has {k}={ckpt['model_args'].get(k, defaults[k])} but the config "
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
        disk.copy_file(tokenizer_path, out / Path(tokenizer_path).name)
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
                f"checkpoints, torch; checkpoints.atomic_save(torch.load('OLD.pt', weights_only=True), "
                f"'NEW.safetensors')\""
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


def read_config(path):
    """The config stored in a checkpoint, read from its metadata alone (no tensor is loaded)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        return unflatten_state(json.loads(metadata["structure"])["dict"]["config"], {})  # the config holds no tensor
    except (SafetensorError, OSError, KeyError, ValueError, TypeError) as e:
        raise UserError(
            f"checkpoint {path} is truncated, corrupted or not ours ({type(e).__name__}); retrain"
        ) from None


def run_kind(config):
    """pretrain, sft or dpo, from the manifest of the data a run trained on."""
    manifest = Path(config.get("data_dir", "")) / "manifest.json"
    return json.loads(manifest.read_text()).get("mode", "pretrain") if manifest.is_file() else "pretrain"


def lineage(run, config):
    """[(run folder, config)] from this run back to its pretraining run, following init_from (as far as the
    checkpoints tell: a resumed SFT or DPO run records init_from=resume)."""
    chain = [(Path(run), config)]
    while run_kind(chain[-1][1]) != "pretrain" and chain[-1][1].get("init_from", "resume") != "resume":
        base = Path(chain[-1][1]["init_from"])
        path = find_checkpoint(base, "best", f"the init_from that {chain[-1][0]}'s checkpoint names")
        chain.append((base, read_config(path)))
    return chain


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
