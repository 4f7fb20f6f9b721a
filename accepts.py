"""What a config key accepts, declared where the key is defined, as the annotation of the script's global:

    block_size: between(1, 4096) = 1024  # sequence length in tokens: the model's context
    data_dir: folder = "data/stdlib"  # folder made by prepare.py
    batch_size: auto | at_least(1) = 8  # either: auto, or an integer from 1
    near_dup: auto | 0.0 | float & between(0.5, 0.95) = "auto"  # a float that defaults to auto

A key's type is stated, never guessed from the numbers in its declaration: by the declaration (`float & ...`,
`auto | bool`) where it says one, else by the default (--block_size=64 is read as an int, and a config file's 64.0 is
refused). A key that defaults to "auto" and takes more than text must state its type: runtime.configure raises a
TypeError for the script's author otherwise (it would read the text 0.7 as text, not as a float).

runtime.configure checks every final value against its key's declaration before any work starts, and answers a
value outside it with `error: KEY=VALUE: expected WHAT`. A key with no declaration is only type-checked; the fuzz
test (tests/test_fuzz_config.py) names it. Importing this module has no side effects.
"""

import math
from pathlib import Path

import torch


class Accepts:
    """A set of values: test(value) says whether value is in it, what completes "expected ..." in the error."""

    def __init__(self, test, what, literals=(), kind=None, edges=()):
        self.test, self._what, self.literals = test, what, tuple(literals)
        self.kind = kind  # the type it states (float & between(...)), or None: the key's default's type is the type
        self.edges = tuple(edges)  # the numbers at its boundaries, tried by tests/test_bounds.py with a huge and a tiny

    @property
    def what(self):
        return self._what() if callable(self._what) else self._what  # a function: read when an error is raised

    def __call__(self, value):
        try:
            return bool(self.test(value))
        except (TypeError, ValueError, OverflowError, OSError):  # a wrong type, a path too long: not in the set
            return False

    def __or__(self, other):
        other = as_accepts(other)
        if self.kind and other.kind and self.kind is not other.kind:
            raise TypeError(f"a declaration states two types: {self.kind.__name__} and {other.kind.__name__}")
        return Accepts(
            lambda v: self(v) or other(v),
            f"{self.what}, or {other.what}",
            self.literals + other.literals,
            self.kind or other.kind,
            self.edges + other.edges,
        )

    def __ror__(self, other):
        return as_accepts(other) | self

    def __rand__(self, kind):
        """kind & declaration: the same values, of type kind (see the module's docstring)."""
        if kind not in (int, float, bool, str):
            return NotImplemented
        return Accepts(self.test, self._what, self.literals, kind, self.edges)

    def saying(self, what):
        """The same values under other words in the error and --help: what each choice means, where the declaration
        alone would not say (prepare.py's tokenizer: train one, tiktoken's, or a run's file)."""
        return Accepts(self.test, what, self.literals, self.kind, self.edges)

    def __repr__(self):
        return f"<accepts {self.what}>"


def as_accepts(x):
    """A declaration, a type (auto | bool: any bool, and the key's type is bool), or a plain value (a literal:
    exactly that value)."""
    if x in (int, float, bool, str):
        return x & Accepts(lambda v: isinstance(v, x), "true or false" if x is bool else f"any {x.__name__}")
    return x if isinstance(x, Accepts) else one_of(x)


def show(v):
    """A value as a user types it: text as it is, the empty text as "" (so a choice of it is not printed as
    nothing), anything else as Python writes it."""
    return '""' if v == "" else v if isinstance(v, str) else repr(v)


def number(v):
    """A real number that is not a bool, NaN or infinite."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def between(lo, hi):
    kind = "an integer" if isinstance(lo, int) and isinstance(hi, int) else "a number"
    return Accepts(lambda v: number(v) and lo <= v <= hi, f"{kind} from {lo} to {hi}", edges=(lo, hi))


def at_least(lo, below=None):
    """lo <= value, and value < below where given (AdamW's betas: at_least(0, below=1))."""
    if below is None:
        return Accepts(lambda v: number(v) and v >= lo, f"a number >= {lo}", edges=(lo,))
    return Accepts(lambda v: number(v) and lo <= v < below, f"a number >= {lo} and below {below}", edges=(lo, below))


def above(lo, most=None):
    """value > lo, and value <= most where given (a share of a learning rate: above(0, most=1))."""
    if most is None:
        return Accepts(lambda v: number(v) and v > lo, f"a number > {lo}", edges=(lo,))
    return Accepts(lambda v: number(v) and lo < v <= most, f"a number > {lo} and <= {most}", edges=(lo, most))


def one_of(*choices):
    shown = [show(c) for c in choices]
    what = shown[0] if len(shown) == 1 else ", ".join(shown[:-1]) + f" or {shown[-1]}"
    # True == 1 in Python: compare types too, so a bool key's choices do not take 1, nor an int key's take True
    edges = [c for c in choices if number(c)]
    return Accepts(lambda v: any(v == c and type(v) is type(c) for c in choices), what, choices, edges=edges)


def comma_list(*choices):
    """A non-empty comma-separated list, each item one of choices."""
    return Accepts(
        lambda v: isinstance(v, str) and all(item in choices for item in v.split(",")),
        f"a comma-separated list of {', '.join(choices)}",
    )


auto = one_of("auto")  # batch_size: auto | at_least(1) (a bare "auto" in an annotation reads as a type's name)
empty = one_of("")  # hf_dir: empty | writable
precision = one_of("auto", "float32", "bfloat16", "float16")  # the PyTorch scripts' dtype
ns_precision = one_of("auto", "float32", "bfloat16")  # Muon's Newton-Schulz arithmetic (ns_dtype)
finite = Accepts(number, "a finite number")
int_list = Accepts(  # "" is none
    lambda v: all(p.isdigit() and 0 < int(p) < 2**31 for p in v.split(",") if v), "comma-separated positive integers"
)
any_text = Accepts(lambda v: isinstance(v, str), "any text")
nonempty = Accepts(lambda v: isinstance(v, str) and v.strip() != "", "a non-empty text")
folder = Accepts(lambda v: isinstance(v, str) and v != "" and Path(v).is_dir(), "a folder that exists")
folders = Accepts(  # "" is none
    lambda v: isinstance(v, str) and all(p != "" and Path(p).is_dir() for p in v.split(",") if v),
    "comma-separated folders that exist (or none)",
)
file = Accepts(lambda v: isinstance(v, str) and v != "" and Path(v).is_file(), "a file that exists")


def can_write(v):
    """A path a script may create: not empty, not an existing non-folder, and its nearest existing parent a folder."""
    if not isinstance(v, str) or not v.strip() or "\0" in v:
        return False
    path = Path(v)
    if path.exists():
        return path.is_dir()
    parent = next((p for p in path.absolute().parents if p.exists()), None)
    return parent is not None and parent.is_dir()


writable = Accepts(can_write, "a path to write (not an existing file, under a folder)")


def can_write_file(v):
    """A file a script may write or replace (bench.py's results, export.py's GGUF file, whose own guard asks for
    --overwrite): not empty, not an existing folder, and its nearest existing parent a folder."""
    return isinstance(v, str) and not Path(v).is_dir() and (Path(v).is_file() or can_write(v))


writable_file = Accepts(can_write_file, "a file path to write (not a folder, under a folder)")


def has_device(v):
    """A PyTorch device that exists on this machine: auto, cpu, cuda or cuda:N with an NVIDIA GPU, mps on a Mac."""
    if not isinstance(v, str):
        return False
    kind, _, index = v.partition(":")
    if v in ("auto", "cpu"):
        return True
    if kind == "cuda" and (not index or index.isdigit()):
        return torch.cuda.is_available() and int(index or 0) < torch.cuda.device_count()
    return v == "mps" and torch.backends.mps.is_available()


def device_type(device):
    """cuda, mps or cpu: the kind of a device torch_device accepts, auto resolved as runtime.setup_device does."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    return device.split(":")[0]


def devices_here():
    cuda = [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    mps = ["mps"] if torch.backends.mps.is_available() else []
    return "a device this machine has: " + ", ".join(["auto", "cpu", *(["cuda"] if cuda else []), *cuda, *mps])


torch_device = Accepts(has_device, devices_here)


def has_mlx_device(v):
    """auto or cpu, or gpu where MLX has Metal (not mlx[cpu] on Linux)."""
    if v == "gpu":
        import mlx.core as mx  # here, not at the top: only train_mlx.py needs MLX

        return mx.metal.is_available()
    return v in ("auto", "cpu")


mlx_device = Accepts(has_mlx_device, "auto, cpu, or gpu where MLX has a Metal GPU (not mlx[cpu] on Linux)")
