"""What each device type gets, decided here and nowhere else: the autocast precision, whether compile=auto compiles,
Muon's Newton-Schulz precision, loss scaling, how memory is read and capped, what an out-of-memory error says, and
the CUDA-only paths (pinned memory, TF32, FlexAttention, CUDA graphs). A pure function of the device type and the
torch version: runtime.setup_device, batching.py, bench.py and train_mlx.py take their choices from it, and
tests/test_backends.py walks it for every device type against the table in docs/backends.md.

Where each row was run: cuda on H100 and H200 GPUs (torch 2.11); cpu on 2-core x86 CPUs with and without bf16
instructions (torch 2.13); mlx-cpu with mlx[cpu] on Linux. mps and mlx-gpu were never run by this repo: their rows
are read from PyTorch's MPS documentation and issues, and chosen to be the safe ones (docs/backends.md says why).
"""

import re

DEVICE_TYPES = ("cuda", "mps", "cpu", "mlx-gpu", "mlx-cpu")

# The messages that mean "out of memory" (batch_size=auto halves the micro-batch on them), lower case.
OOM_TEXTS = {
    # run on CUDA: torch.OutOfMemoryError's "CUDA out of memory", and cuBLAS failing to allocate its workspace
    "cuda": ("out of memory", "alloc_failed"),
    # read, not run: the MPS allocator raises RuntimeError("MPS backend out of memory (MPS allocated: ...") past
    # its high-water mark, and "Invalid buffer size: 19.45 GB" for one tensor larger than Metal's largest buffer
    # (pytorch#130112, pytorch#141909)
    "mps": ("out of memory", "invalid buffer size"),
    "cpu": (),  # running out kills the process (the kernel's OOM killer): nothing to catch
    # run with mlx[cpu]: "[metal::malloc] ... out of memory"; a dry run's peak past the limit is a MemoryError
    "mlx-gpu": ("out of memory",),
    "mlx-cpu": ("out of memory",),
}


def torch_version(text):
    """(major, minor) of a torch version string such as "2.13.0+cpu"."""
    major, minor = re.match(r"(\d+)\.(\d+)", text).groups()
    return int(major), int(minor)


def device_defaults(device_type, version):
    """What device_type ("cuda", "mps", "cpu", "mlx-gpu", "mlx-cpu") gets under torch `version` (a string). A dict:
    dtype: the autocast precision of dtype=auto. dtypes: those dtype may be set to there.
    compile: what compile=auto means. compile_refused / compile_note: why compile=true is refused, or the line
    printed when the user turns it on (None where neither). ns_dtype: Muon's Newton-Schulz precision (ns_dtype=auto).
    loss_scaling: a GradScaler with dtype=float16 (False: refused). memory: how memory is read ("allocator": CUDA's
    caching allocator and its peak; "driver": Metal's allocation; "rss": the process). memory_limit: the cap a
    batch_size=auto dry run keeps under (None: cannot be caught). oom: OOM_TEXTS'. pin_memory, tf32, flex_attention,
    cuda_graphs: the CUDA-only paths. run_on: where this row was run."""
    v = torch_version(version)
    if device_type == "cuda":  # run on H100 and H200 (torch 2.11)
        return dict(
            dtype="bfloat16",
            dtypes=("float32", "bfloat16", "float16"),
            compile=True,  # 430K against 207K tok/s eager on an H100 (README, Performance)
            compile_refused=None,
            compile_note=None,
            ns_dtype="bfloat16",  # tensor cores; the step is 0.7% of a training step (PERF.md)
            loss_scaling=True,
            memory="allocator",
            memory_limit="total_memory",
            oom=OOM_TEXTS["cuda"],
            pin_memory=True,
            tf32=True,
            flex_attention=True,
            cuda_graphs=True,
            run_on="H100 and H200 GPUs, torch 2.11",
        )
    if device_type == "mps":  # never run: read against PyTorch's MPS docs and issues (docs/backends.md)
        return dict(
            # fp32: fp16 autocast needs a GradScaler, whose unscale failed on MPS before torch 2.8 (float64,
            # pytorch#142397; MPS kernels in pytorch#150255) and zeroed fp16/bf16 gradients until pytorch#184286
            dtype="float32",
            dtypes=("float32", "float16") if v >= (2, 8) else ("float32",),
            compile=False,
            # MPSInductor, torch.compile's Apple GPU backend, arrived as a prototype in torch 2.8; before it the
            # inductor backend has no MPS device
            compile_refused=None if v >= (2, 8) else "torch.compile has no MPS backend before torch 2.8",
            compile_note="compile=true on MPS: a prototype there (MPSInductor), never run by this repo; a forum "
            "report measured a compiled transformer layer 6x slower than eager (compile=auto leaves it off)",
            ns_dtype="float32",  # M1/M2 GPUs have no bf16 arithmetic, and older macOS no bf16 on MPS at all
            loss_scaling=v >= (2, 8),
            memory="driver",  # torch.mps.driver_allocated_memory: MPS keeps no peak, the driver's keeps the cache
            memory_limit="recommended_max_memory",  # torch.mps.recommended_max_memory (Metal's working set)
            oom=OOM_TEXTS["mps"],
            pin_memory=False,
            tf32=False,
            flex_attention=False,  # FlexAttention's kernels are Triton's (CUDA); doc_mask is dense SDPA there
            cuda_graphs=False,
            run_on="never run (read against PyTorch's MPS documentation)",
        )
    if device_type == "cpu":  # run on 2-core x86 CPUs with and without bf16 instructions (torch 2.13)
        return dict(
            dtype="float32",
            dtypes=("float32", "bfloat16", "float16"),
            compile=False,  # compiling the Quick start's model takes longer than its whole run
            compile_refused=None,
            compile_note=None,
            # bf16 matmuls without AVX-512 bf16 / AMX are emulated: 50-100x slower than fp32 (docs/backends.md)
            ns_dtype="float32",
            loss_scaling=True,
            memory="rss",
            memory_limit=None,
            oom=OOM_TEXTS["cpu"],
            pin_memory=False,
            tf32=False,
            flex_attention=False,  # FlexAttention has no CPU backward
            cuda_graphs=False,
            run_on="2-core x86 CPUs (AMD EPYC, with and without bf16 instructions), torch 2.13",
        )
    if device_type in ("mlx-gpu", "mlx-cpu"):  # mlx-cpu run with mlx[cpu] on Linux; mlx-gpu never run
        gpu = device_type == "mlx-gpu"
        return dict(
            dtype="bfloat16" if gpu else "float32",
            dtypes=("float32", "bfloat16"),  # no fp16: it would need loss scaling
            compile=True,  # mx.compile of the step and the update (run on the CPU)
            compile_refused=None,
            compile_note=None,
            ns_dtype="float32",  # as on MPS: M1/M2 GPUs have no bf16 arithmetic; on the CPU bf16 is converted
            loss_scaling=False,
            memory="mlx",
            memory_limit="max_recommended_working_set_size" if gpu else "memory_limit",
            oom=OOM_TEXTS[device_type],
            pin_memory=False,
            tf32=False,
            flex_attention=False,
            cuda_graphs=False,
            run_on="never run (Apple GPUs)" if gpu else "mlx[cpu] on Linux x86 CPUs",
        )
    raise ValueError(f"device type {device_type!r}: expected one of {', '.join(DEVICE_TYPES)}")
