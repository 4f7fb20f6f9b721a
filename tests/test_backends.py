"""backends.device_defaults, what each device type gets, against docs/backends.md and against what was measured:
the documented table for every device type (so a CUDA-only default cannot reach a Mac unnoticed), the Newton-Schulz
precision that reaches Muon, its cost on a CPU without bf16 instructions, MPS's out-of-memory errors, and the ops
model.py runs against PyTorch's list of MPS kernels."""

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import backends
import batching
import muon
import runtime
from accepts import auto
from model import GPT, GPTConfig, document_mask

ROOT = Path(__file__).resolve().parents[1]
FIELDS = ("dtype", "compile", "ns_dtype", "loss_scaling", "memory", "memory_limit", "pin_memory", "tf32")
FIELDS += ("flex_attention", "cuda_graphs")
# The safe set on a Mac, as docs/backends.md states it: nothing there was run, so nothing CUDA-only and no prototype
MPS_SAFE = dict(dtype="float32", compile=False, ns_dtype="float32", pin_memory=False, tf32=False)
MPS_SAFE.update(flex_attention=False, cuda_graphs=False, memory="driver", memory_limit="recommended_max_memory")


def documented_table():
    """docs/backends.md's table of defaults: {device type: {setting: text}}, for the torch it names."""
    lines = (ROOT / "docs" / "backends.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| setting |"))
    end = next(i for i in range(start, len(lines)) if not lines[i].startswith("|"))
    types = [c.strip() for c in lines[start].strip("|").split("|")][1:]
    table = {t: {} for t in types}
    for line in lines[start + 2 : end]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        setting = cells[0].strip("`")
        for t, cell in zip(types, cells[1:], strict=True):
            table[t][setting] = cell.strip("`")
    return table


def test_every_device_type_gets_what_docs_backends_md_says():
    """The table in docs/backends.md (torch >= 2.8) is device_defaults' for cuda, mps, cpu and MLX's two devices, and
    MPS's is the safe set: a changed default fails here until the page says so too."""
    table = documented_table()
    assert set(table) == set(backends.DEVICE_TYPES)
    for device_type, documented in table.items():
        got = backends.device_defaults(device_type, "2.13.0")
        assert set(documented) == set(FIELDS), set(FIELDS) ^ set(documented)
        for field in FIELDS:
            assert documented[field] == str(got[field]).lower().replace("none", "-"), (device_type, field)
    mps = backends.device_defaults("mps", "2.13.0")
    assert {k: mps[k] for k in MPS_SAFE} == MPS_SAFE
    assert mps["compile_note"] and "prototype" in mps["compile_note"]


def test_mps_before_torch_2_8_refuses_compile_and_fp16():
    """torch 2.5-2.7 (pyproject allows 2.5): no MPS backend for torch.compile, and GradScaler's unscale fails on MPS
    (float64), so compile=true and dtype=float16 are refused there; from 2.8 both may be asked for."""
    old, new = backends.device_defaults("mps", "2.5.1"), backends.device_defaults("mps", "2.8.0")
    assert old["compile_refused"] and old["dtypes"] == ("float32",) and not old["loss_scaling"]
    assert new["compile_refused"] is None and "float16" in new["dtypes"] and new["loss_scaling"]
    assert {k: old[k] for k in MPS_SAFE} == MPS_SAFE  # the defaults themselves do not depend on the version
    with pytest.raises(ValueError, match="expected one of"):
        backends.device_defaults("xpu", "2.13.0")


# What device=auto picks and what that device then gets, written here from what was measured and decided (README and
# docs/configuration.md: "auto (cuda > mps > cpu)"; cuda: bf16 autocast and compile, 430K against 207K tok/s eager
# on an H100, Muon's Newton-Schulz in bf16 on tensor cores; cpu: fp32, bf16 products emulated 50x slower without
# bf16 instructions; mps: the safe set), not read from backends.py or the table it is checked against above.
AUTO = {"cuda": (torch.bfloat16, True, "bfloat16"), "mps": (torch.float32, False, "float32")}
AUTO["cpu"] = (torch.float32, False, "float32")


@pytest.mark.parametrize("cuda, mps", [(True, True), (True, False), (False, True), (False, False)])
def test_device_auto_picks_cuda_then_mps_then_cpu(monkeypatch, cuda, mps):
    """runtime.setup_device("auto") with CUDA and MPS made available or not: the first of cuda, mps, cpu that is
    there, with dtype=auto, compile=auto and ns_dtype=auto resolved as AUTO says (nothing runs on the device)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)  # autocast asks on CUDA
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    monkeypatch.delenv("RANK", raising=False)
    # setup_device turns TF32 on for CUDA; put back by hand: pytest 9's monkeypatch deletes, on undo, an attribute
    # that is not in the object's __dict__, and torch's flag objects (a property of their class) then raise
    flags = (torch.backends.cuda.matmul, torch.backends.cudnn)
    saved = [f.allow_tf32 for f in flags]
    try:
        env = runtime.setup_device("auto", dtype="auto", compile="auto", ns_dtype="auto")
        tf32 = torch.backends.cuda.matmul.allow_tf32
    finally:
        for f, value in zip(flags, saved, strict=True):
            f.allow_tf32 = value
    expected = "cuda" if cuda else "mps" if mps else "cpu"
    assert (env["device"], env["device_type"]) == (expected, expected)
    assert (env["ptdtype"], env["compile"], env["ns_dtype"]) == AUTO[expected]
    assert tf32 == (expected == "cuda")


def test_setup_device_resolves_auto_on_the_cpu(capsys):
    env = runtime.setup_device("cpu", compile="auto")
    assert (env["ptdtype"], env["compile"], env["ns_dtype"]) == (torch.float32, False, "float32")
    assert runtime.setup_device("cpu", compile=True, ns_dtype="bfloat16")["ns_dtype"] == "bfloat16"
    with pytest.raises(runtime.UserError, match="ns_dtype=float16"):
        runtime.setup_device("cpu", ns_dtype="float16")
    assert capsys.readouterr().out == ""  # the prototype line is MPS's only


def test_compile_auto_is_a_bool_that_also_takes_auto(tmp_path):
    """A key declared `auto | bool` with the default "auto" (train.py's compile): true/false parse
    as bools, a config file's bool is accepted, and anything else is one error line."""

    def namespace():
        return {"compile": "auto", "__annotations__": {"compile": auto | bool}}

    assert runtime.configure(namespace(), [])["compile"] == "auto"
    assert runtime.configure(namespace(), ["--compile=true"])["compile"] is True
    assert runtime.configure(namespace(), ["--compile"])["compile"] is True
    (tmp_path / "c.py").write_text("compile = False\n")
    assert runtime.configure(namespace(), [str(tmp_path / "c.py")])["compile"] is False
    with pytest.raises(runtime.UserError, match="compile"):
        runtime.configure(namespace(), ["--compile=yes"])


def test_ns_dtype_reaches_the_newton_schulz_iteration(monkeypatch):
    """make_optimizer's ns_dtype is the precision the iteration runs in (not muon.NS_DTYPE's bf16)."""
    seen = []
    ns = muon.zeropower_via_newtonschulz5
    monkeypatch.setattr(muon, "zeropower_via_newtonschulz5", lambda G, steps, dtype: seen.append(dtype) or ns(G, steps))
    model = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=1, n_head=2, n_embd=32, mlp_hidden=64))
    for dtype in ("float32", "bfloat16"):
        optimizer = runtime.make_optimizer(model, 0.02, 0.95, 0.006, (0.9, 0.95), 0.0, ns_dtype=dtype)
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        optimizer.step()
    assert set(seen[: len(seen) // 2]) == {torch.float32} and set(seen[len(seen) // 2 :]) == {torch.bfloat16}


RATIO = """
import json, sys, time, torch
sys.path.insert(0, sys.argv[1])
import backends, runtime
from model import GPT, GPTConfig
torch.manual_seed(0)
config = GPTConfig(block_size=256, vocab_size=4096, n_layer=4, n_head=4, n_embd=256, mlp_hidden=768)  # tiny_cpu.py
model, x = GPT(config), torch.randint(0, 4096, (16, 257))  # its micro-batch: 16 x 256 tokens


def seconds(fn, n):
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n


def forward_backward():
    model(x[:, :-1], x[:, 1:])[1].backward()


chosen = backends.device_defaults("cpu", torch.__version__)["ns_dtype"]  # what ns_dtype=auto runs on a CPU
optimizer = runtime.make_optimizer(model, 0.02, 0.95, 0.006, (0.9, 0.95), 0.0, ns_dtype=chosen)
forward_backward(), optimizer.step()  # the state is allocated outside the timing
auto = seconds(optimizer.step, 2)
optimizer.param_groups[0]["ns_dtype"] = "bfloat16"  # the Muon group, as ns_dtype=bfloat16 makes it
bf16 = seconds(optimizer.step, 1)
forward_backward_s = seconds(forward_backward, 2)
print(json.dumps({"auto": auto / forward_backward_s, "bfloat16": bf16 / forward_backward_s, "chosen": chosen}))
"""


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="the emulated ISA is x86's")
def test_optimizer_step_is_a_fraction_of_forward_backward_without_bf16_instructions():
    """On a CPU without bf16 instructions (emulated: oneDNN capped at AVX2), one Muon step of the Quick start model
    in the CPU's Newton-Schulz precision costs under 0.3x its forward and backward (0.12-0.15x measured); in bf16
    it costs several times that (4.9x measured), which is what the issue found: the choice matters."""
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
    proc = subprocess.run([sys.executable, "-c", RATIO, str(ROOT)], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    ratio = json.loads(proc.stdout)
    assert ratio["auto"] < 0.3, ratio
    assert ratio["bfloat16"] > 1.0, ratio  # the emulation holds: bf16 would have been the slow choice


def test_out_of_memory_knows_what_mps_raises():
    """batch_size=auto halves on MPS's out-of-memory errors (the allocator's, and one buffer larger than Metal
    allows), as written in PyTorch's issues, and on nothing else."""
    mps_oom = "MPS backend out of memory (MPS allocated: 5.50 GB, other allocations: 14.76 GB, max allowed: 20.40 GB)."
    assert batching.out_of_memory(RuntimeError(mps_oom))
    assert batching.out_of_memory(RuntimeError("Invalid buffer size: 19.45 GB"))
    assert not batching.out_of_memory(RuntimeError("The operator 'aten::foo' is not currently implemented for MPS"))
    sizes = []

    def try_step(size):
        sizes.append(size)
        if size > 4:
            raise RuntimeError(mps_oom)

    assert batching.find_batch_size(try_step, 16, lambda: None) == (4, [16, 8, 4]) and sizes == [16, 8, 4]


def traced_ops():
    """The aten ops (with overload) of a training step, an optimizer step, doc_mask, the per-token loss, and
    generation (greedy and sampled, with the KV cache), run on the CPU."""
    from torch.utils._python_dispatch import TorchDispatchMode

    ops = set()

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ops.add(func.name())
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=128, n_layer=2, n_head=2, n_embd=32, mlp_hidden=64))
    optimizer = runtime.make_optimizer(model, 0.02, 0.95, 0.006, (0.9, 0.95), 0.1, ns_dtype="float32")
    x = torch.randint(0, 128, (2, 32))
    with Record():
        model(x, x)[1].backward()
        model(x, x, mask=document_mask(x, 1))[1].backward()
        model(x, x, reduction="none")[1].sum().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        model.generate(x[:, :4], 4, temperature=0.8, top_k=10, top_p=0.9)
        model.generate(x[:, :4], 4, temperature=0)
    return ops


def test_every_op_model_py_runs_has_an_mps_kernel():
    """Each aten op that training, doc_mask and generation run has an MPS kernel or a device-generic one in the
    installed torch's native_functions.yaml (PyTorch's own list, which the MPS op-coverage table is made from), so
    none needs PYTORCH_ENABLE_MPS_FALLBACK. CPU-only kernels chosen under an op that has an MPS one are mapped to it."""
    yaml = pytest.importorskip("yaml")
    path = Path(__import__("torchgen").__file__).parent / "packaged" / "ATen" / "native" / "native_functions.yaml"
    if not path.is_file():
        pytest.skip("this torch ships no native_functions.yaml")
    entries = {}
    for entry in yaml.safe_load(path.read_text()):
        entries[entry["func"].split("(")[0]] = entry
    cpu_only = {  # SDPA picks a kernel per device: on MPS its math kernel for MPS
        "_scaled_dot_product_flash_attention_for_cpu": "_scaled_dot_product_attention_math_for_mps",
        "_scaled_dot_product_flash_attention_for_cpu_backward": "_scaled_dot_product_attention_math_for_mps",
    }

    def on_mps(name):
        entry = entries.get(name) or entries.get(name.removesuffix(".default"))
        if entry is None:
            return False
        dispatch, delegate = entry.get("dispatch"), entry.get("structured_delegate")
        if delegate and on_mps(delegate):  # a structured op: its dense kernels are its out= variant's
            return True
        if dispatch is None:  # no dispatch section and no delegate: CompositeImplicitAutograd, made of other ops
            return not delegate
        keys = {k.strip() for key in dispatch for k in key.split(",")}
        return "MPS" in keys or any(k.startswith("Composite") for k in keys)

    ops = traced_ops()
    assert "aten::baddbmm" in ops and "aten::embedding_dense_backward" in ops  # the trace is real
    missing = []
    for op in sorted(ops):
        namespace, _, name = op.partition("::")
        if namespace != "aten":
            continue
        base, dot, overload = name.partition(".")
        name = cpu_only.get(base, base) + (dot + overload if base not in cpu_only else "")
        if not on_mps(name):
            missing.append(op)
    assert not missing, f"ops without an MPS kernel in torch {torch.__version__}: {missing}"
    # The check bites: ops that this torch's own list gives CPU and CUDA kernels and no MPS or device-generic one are
    # found (so the control holds on any torch version; `_ctc_loss` was one until torch 2.14 gave it an MPS kernel)
    # and on_mps refuses every one of them.
    controls = [name for name, entry in entries.items() if cpu_and_cuda_only(entry)]
    assert len(controls) >= 10, f"torch {torch.__version__}: only {controls} have CPU and CUDA kernels alone"
    assert not [name for name in controls if on_mps(name)]


def cpu_and_cuda_only(entry):
    """An entry of native_functions.yaml with CPU and CUDA kernels and no MPS, device-generic or delegated one."""
    if not entry.get("dispatch") or entry.get("structured_delegate"):
        return False
    keys = {k.strip() for key in entry["dispatch"] for k in key.split(",")}
    return {"CPU", "CUDA"} <= keys and "MPS" not in keys and not any(k.startswith("Composite") for k in keys)
