"""Sample text from a trained run.

    python sample.py --out_dir=out/tiny
    python sample.py --out_dir=out/tiny --start="def fibonacci(n):" --num_samples=3 --max_new_tokens=200
    python sample.py --out_dir=out/tiny --start=FILE:prompt.txt --temperature=0   # greedy
    python sample.py --out_dir=out/tiny_sft --chat                                 # multi-turn chat in the terminal
    python sample.py --out_dir=out/tiny_sft --chat --start="What does json.dumps do?"   # one answer to stdout
    echo "What does os.getcwd do?" | python sample.py --out_dir=out/tiny_sft --chat     # a turn per stdin line

Loads the checkpoint (ckpt_best.safetensors, else the latest step) and the tokenizer from the run folder, and decodes
with the KV cache.
"""

import sys
import time
from pathlib import Path

import torch

import runtime
from accepts import above, any_text, at_least, between, folder, nonempty, precision, torch_device
from chat import END, render_prompt
from generation import load_run
from runtime import UserError

# -----------------------------------------------------------------------------
out_dir: folder = "out/run"  # run folder written by train.py
ckpt: nonempty = "best"  # best (falls back to latest), latest, or a checkpoint file name in out_dir
start: any_text = ""  # prompt text, or FILE:path to read it from a file; empty = start a new document
num_samples: between(1, 2**16) = 2  # samples to draw (decoded as one batch)
max_new_tokens: at_least(1) = 200  # tokens generated per sample
temperature: at_least(0) = 0.8  # 0 = greedy; below 1 is more conservative, above 1 more random
top_k: at_least(0) = 200  # keep only the k most likely tokens (0 = off)
top_p: above(0, most=1) = 0.95  # keep the smallest set of tokens whose probability reaches p (1.0 = off)
seed: between(0, 2**32 - 1) = 1337  # sampling seed
chat = False  # chat with an SFT run: answer --start, or each stdin line, or talk in the terminal
compile = False  # CUDA: compile the one-token step and replay it as a CUDA graph (~1 min to start, then ~20x faster)
device: torch_device = "auto"  # auto (cuda > mps > cpu), cuda, mps, cpu
dtype: precision = "auto"  # auto (bfloat16 on CUDA, float32 on MPS and CPU: backends.py), float32, bfloat16, float16
# -----------------------------------------------------------------------------
runtime.install_error_handler()
config = runtime.configure(
    globals(),
    sys.argv[1:],
    rules=[
        (
            lambda c: not c.start.startswith("FILE:") or Path(c.start[5:]).is_file(),
            "start={start}: FILE: names a file that is not there",
        )
    ],
)
env = runtime.setup_device(device, dtype)

# ----------------------------------------------------------------------------- model
model, tok, checkpoint, path = load_run(out_dir, ckpt, env)

# ----------------------------------------------------------------------------- chat
generator = torch.Generator(env["device"]).manual_seed(seed)
graph = compile and env["defaults"]["cuda_graphs"]  # run on H100; elsewhere (CPU run, MPS never) the eager step
block_size = model.config.block_size


def reply(history):
    """The assistant's next answer to a [{role, content}] history, trimmed from the oldest turn to fit."""
    end = tok.special[END]
    while True:
        ids = render_prompt(tok, history)
        keep = 2 if history[0]["role"] == "system" else 1  # never drop the system message or the new question
        if len(ids) + max_new_tokens <= block_size or len(history) <= keep:
            break
        history[:] = history[2:] if history[0]["role"] != "system" else history[:1] + history[3:]
    ids = ids[-(block_size - 1) :]
    x = torch.tensor([ids], dtype=torch.long, device=env["device"])
    y = model.generate(x, max_new_tokens, temperature, top_k, top_p, stop_token=end, generator=generator, graph=graph)
    text = tok.decode([i for i in y[0, len(ids) :].tolist() if i != end])
    history.append({"role": "assistant", "content": text})
    return text


if chat:
    if END not in tok.special:
        raise UserError(f"{out_dir} has no chat tokens in its tokenizer; --chat needs a run made by sft.py")
    history = []
    if start:  # scriptable: one answer, nothing else on stdout
        print(reply([{"role": "user", "content": start}]))
    elif not sys.stdin.isatty():  # a pipe: each line is the next user turn of one conversation
        for line in sys.stdin:
            if line.strip():
                history.append({"role": "user", "content": line.rstrip("\n")})
                print(reply(history), flush=True)
    else:
        print(f"chatting with {path} (empty line or Ctrl-D to quit)", file=sys.stderr)
        try:
            while line := input("you> ").strip():
                history.append({"role": "user", "content": line})
                print(f"bot> {reply(history)}")
        except EOFError:
            pass
    sys.exit(0)

# ----------------------------------------------------------------------------- prompt
if start.startswith("FILE:"):
    prompt_file = Path(start[5:])
    if not prompt_file.is_file():
        raise UserError(f"prompt file {prompt_file} not found")
    start = prompt_file.read_text(encoding="utf-8")
ids = [tok.bos_id] + tok.encode(start)  # training documents start with the boundary token too
if len(ids) > block_size:
    print(
        f"note: the prompt is {len(ids)} tokens, longer than the context of {block_size}; "
        f"keeping its last {block_size} tokens",
        file=sys.stderr,
    )
    ids = ids[-block_size:]
x = torch.tensor([ids] * num_samples, dtype=torch.long, device=env["device"])

# ----------------------------------------------------------------------------- sample
t0 = time.time()
y = model.generate(
    x, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator, graph=graph
)
dt = time.time() - t0
for row in y.tolist():
    new = row[len(ids) :]
    if tok.bos_id in new:  # the model started another document: this sample ends there
        new = new[: new.index(tok.bos_id)]
    print(tok.decode(row[: len(ids)] + new))
    print("-" * 80)
print(
    f"{num_samples} x {max_new_tokens} tokens in {dt:.2f}s ({num_samples * max_new_tokens / dt:.0f} tok/s) from {path}",
    file=sys.stderr,
)
