"""export.py's folder in mlx-lm (MLX's CPU build on Linux, as CI runs it): mlx_lm.load gives our logits and greedy
tokens, stopping at <|end|>, and its chat template gives chat.py's ids. Marker export_tools (CI's second step):
`mlx_lm generate` on the command line answers as our model does; a train_mlx.py run exports the same way."""

import sys

import numpy as np
import pytest
import torch
from conftest import TINY, run
from test_export import CONVERSATIONS, TINY_CONFIG, export, load_run, tiny_run

mx = pytest.importorskip("mlx.core")  # the `test` extra installs MLX and mlx-lm on Linux and macOS
mlx_lm = pytest.importorskip("mlx_lm")

from mlx_lm.generate import stream_generate  # noqa: E402
from mlx_lm.sample_utils import make_sampler  # noqa: E402

import chat  # noqa: E402
import train_mlx  # noqa: E402
from model import GPTConfig  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402


def greedy(ours, prompt, n, stops=()):
    """Our greedy continuation of prompt (ids), cut after the first stop token."""
    out = ours.generate(torch.tensor([prompt]), n, temperature=0)[0, len(prompt) :].tolist()
    end = next((i for i, t in enumerate(out) if t in stops), None)
    return out if end is None else out[: end + 1]


def assert_mlx_lm_matches(run_dir, hf_dir, prompt, reference=None):
    """mlx_lm.load's logits on prompt equal ours (and reference's, an MLX model, if given); its greedy tokens equal
    ours up to and including the first <|endoftext|> or <|end|>, where mlx-lm stops."""
    ours, tok = load_run(run_dir)
    model, wrapper = mlx_lm.load(str(hf_dir))
    assert wrapper.eos_token_ids == {tok.bos_id, tok.special[chat.END]}
    with torch.no_grad():
        mine = ours.logits(torch.tensor([prompt]))[0].numpy()
    theirs = np.array(model(mx.array([prompt]))[0])
    assert np.abs(theirs - mine).max() < 1e-4
    if reference is not None:
        assert np.abs(theirs - np.array(reference.logits(mx.array([prompt]))[0])).max() < 1e-4
    sampler = make_sampler(0.0)
    theirs = [r.token for r in stream_generate(model, wrapper, prompt, max_tokens=32, sampler=sampler)]
    assert theirs == greedy(ours, prompt, 32, wrapper.eos_token_ids), theirs
    return ours, tok, wrapper, theirs


def test_sft_export_in_mlx_lm(sft_run, tmp_path):
    sft, _ = sft_run
    export(sft, tmp_path / "hf")
    tok = Tokenizer(str(sft / "tokenizer.model"))
    _, tok, wrapper, answer = assert_mlx_lm_matches(sft, tmp_path / "hf", chat.render_prompt(tok, CONVERSATIONS[0]))
    assert len(set(answer)) > 3 and answer[-1] == tok.special[chat.END]  # a varied answer, ended by <|end|>

    # the chat template as mlx_lm.generate applies it: rendered to text, then encoded without adding <|endoftext|>
    for messages in CONVERSATIONS:
        text = wrapper.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert wrapper.encode(text, add_special_tokens=False) == chat.render_prompt(tok, messages)


def test_qk_norm_export_in_mlx_lm(tiny_data, tmp_path):
    """A run with qk_norm, attn_scale and embed_norm exports as Qwen3 with an untied head (tests/test_export.py):
    mlx-lm's qwen3 gives our logits and greedy tokens, and train_mlx.GPT's logits."""
    config = GPTConfig(**{**TINY_CONFIG.__dict__, "qk_norm": True, "attn_scale": 0.5, "embed_norm": True})
    run_dir = tiny_run(tmp_path / "run", tiny_data / "tokenizer.model", config)
    export(run_dir, tmp_path / "hf")
    ours, tok = load_run(run_dir)
    mlx_model = train_mlx.GPT(ours.config)
    train_mlx.load_torch_weights(mlx_model, ours)
    assert_mlx_lm_matches(run_dir, tmp_path / "hf", [tok.bos_id, *tok.encode("def f(x):\n")], mlx_model)


@pytest.mark.export_tools
def test_mlx_lm_command_line(sft_run, tmp_path):
    """`mlx_lm generate` as a user runs it: the chat template, greedy decoding, the stop at <|end|>."""
    sft, _ = sft_run
    export(sft, tmp_path / "hf")
    ours, tok = load_run(sft)
    question = "What does `json.dumps` do?"
    cli = [sys.executable, "-m", "mlx_lm", "generate"]
    args = ["--model", tmp_path / "hf", "--prompt", question, "--max-tokens", "48", "--temp", "0", "--verbose", "False"]
    proc = run("mlx_lm", *args, cmd=cli)
    prompt = chat.render_prompt(tok, [{"role": "user", "content": question}])
    mine = greedy(ours, prompt, 48, {tok.bos_id, tok.special[chat.END]})
    assert mine[-1] == tok.special[chat.END]  # the tiny SFT model ends its answer, so the stop is exercised
    assert proc.stdout.rstrip("\n") == tok.decode(mine).rstrip("\n"), (proc.stdout, tok.decode(mine))


@pytest.mark.export_tools
def test_train_mlx_run_exports_the_same_way(tiny_data, tmp_path):
    """A run written by train_mlx.py exports like train.py's: mlx-lm's logits equal train_mlx.GPT's on the
    checkpoint and model.py's at every position of the prompt (6 steps of training: greedy decoding still repeats
    itself, so the logits are the check here)."""
    out = tmp_path / "mlx_run"
    run("train_mlx.py", f"--data_dir={tiny_data}", f"--out_dir={out}", *TINY, "--max_iters=6", "--eval_interval=6")
    export(out, tmp_path / "hf")
    ours, tok = load_run(out)
    mlx_model = train_mlx.GPT(ours.config)
    train_mlx.load_torch_weights(mlx_model, ours)
    assert_mlx_lm_matches(out, tmp_path / "hf", [tok.bos_id, *tok.encode("import os\ndef main(")], mlx_model)
