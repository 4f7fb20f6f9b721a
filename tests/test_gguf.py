"""export.py --format=gguf: one file for llama.cpp (and Ollama, LM Studio).

Default suite (the gguf package, from the `test` extra): the f32 and Q8_0 files' hyperparameters, vocabulary,
special tokens and chat template read back with gguf-py; their weights dequantize to ours; the q/k row order gives
llama.cpp's interleaved RoPE the attention scores of our rotate-half RoPE; a model setting the format cannot
express is refused. Marker export_tools (`python -m pytest -m export_tools`, CI's second step): the same for f16
and bf16, the other bad input, and llama.cpp itself through llama-cpp-python (a source build: `pip install -e
".[export-tools]"`; skipped where it is absent): it tokenizes to our ids, renders the chat template to chat.py's
ids, stops at <|end|>, the f16 file's greedy tokens equal ours and the Q8_0 file's top-1 agreement with our logits
is measured."""

import hashlib
import os
from contextlib import closing
from itertools import islice

import numpy as np
import pytest
import torch
from conftest import run, stdlib_sample
from test_export import CONVERSATIONS, TEXTS, load_run, tiny_run
from test_train import assert_one_line_error

import chat
from model import GPTConfig, apply_rope, rope_tables
from tokenizer import META_SPACE

gguf = pytest.importorskip("gguf")  # the `test` extra installs it

GGUF_BLOCK = {
    "ln_1": "attn_norm",
    "attn.c_q": "attn_q",
    "attn.c_k": "attn_k",
    "attn.c_v": "attn_v",
    "attn.c_proj": "attn_output",
    "ln_2": "ffn_norm",
    "mlp.c_gate": "ffn_gate",
    "mlp.c_fc": "ffn_up",
    "mlp.c_proj": "ffn_down",
}


def export_gguf(run_dir, file, *args, check=True):
    return run("export.py", f"--out_dir={run_dir}", "--format=gguf", f"--gguf_file={file}", *args, check=check)


def read_gguf(file):
    """(metadata fields, {tensor name: (GGML type name, fp32 array in PyTorch's shape)}) of a GGUF file."""
    reader = gguf.GGUFReader(file)
    fields = {name: field.contents() for name, field in reader.fields.items()}
    tensors = {t.name: (t.tensor_type.name, gguf.quants.dequantize(t.data, t.tensor_type)) for t in reader.tensors}
    return fields, tensors


def rope_interleaved(x, theta):
    """llama.cpp's RoPE for Llama (GGML's normal mode): each adjacent pair (x[2i], x[2i+1]) turns by pos * theta_i.
    x: (T, head_dim)."""
    T, D = x.shape
    angle = torch.arange(T)[:, None] * theta ** (-torch.arange(0, D, 2) / D)  # (T, D/2)
    even, odd = x[:, 0::2], x[:, 1::2]
    out = torch.stack([even * angle.cos() - odd * angle.sin(), even * angle.sin() + odd * angle.cos()], -1)
    return out.reshape(T, D)


def heads(x, w, n_head):
    """x @ w.T split into heads: (n_head, T, head_dim)."""
    return (x @ w.T).view(len(x), n_head, -1).transpose(0, 1)


def interleaved_scores(x, wq, wk, n_head, theta):
    """Attention scores (n_head, T, T) as llama.cpp computes them from these q/k weights."""
    q, k = (torch.stack([rope_interleaved(h, theta) for h in heads(x, w, n_head)]) for w in (wq, wk))
    return q @ k.transpose(1, 2)


def gguf_name(name):
    """llama.cpp's name of one of our parameters, written out here independently of export.py's tables."""
    outer = {"transformer.wte.weight": "token_embd.weight", "transformer.ln_f.weight": "output_norm.weight"}
    if name in outer:
        return outer[name]
    _, _, layer, rest = name.split(".", 3)
    return f"blk.{layer}.{GGUF_BLOCK[rest.removesuffix('.weight')]}.weight"


@pytest.fixture(scope="module")
def random_run(tiny_data, tmp_path_factory):
    return tiny_run(tmp_path_factory.mktemp("gguf") / "run", tiny_data / "tokenizer.model")


@pytest.fixture(scope="module")
def gguf_file(random_run):
    """The random run exported once per dtype: dtype -> GGUF file."""
    files = {}

    def get(dtype):
        if dtype not in files:
            files[dtype] = random_run / f"m-{dtype}.gguf"
            export_gguf(random_run, files[dtype], f"--dtype={dtype}")
        return files[dtype]

    return get


def assert_vocabulary(fields, tok):
    """SentencePiece's pieces, scores and kinds; the special tokens by role; no space prefix; the chat template."""
    sp = tok.sp
    assert fields["tokenizer.ggml.model"] == "llama"
    assert fields["tokenizer.ggml.tokens"] == [sp.id_to_piece(i) for i in range(sp.vocab_size())]
    assert fields["tokenizer.ggml.scores"] == pytest.approx([sp.get_score(i) for i in range(sp.vocab_size())])
    types = fields["tokenizer.ggml.token_type"]
    assert types[:6] == [2, 3, 3, 3, 3, 3]  # <unk>, then the five reserved tokens: CONTROL
    assert [i for i, t in enumerate(types) if t == 6] == [i for i in range(sp.vocab_size()) if sp.is_byte(i)]
    assert set(types[6:]) == {1, 6}  # NORMAL pieces and BYTE fallbacks, nothing else
    ids = [fields[f"tokenizer.ggml.{k}_token_id"] for k in ("bos", "eos", "eot", "unknown", "padding")]
    assert ids == [tok.bos_id, tok.bos_id, tok.special[chat.END], 0, 0]
    assert (fields["tokenizer.ggml.add_bos_token"], fields["tokenizer.ggml.add_eos_token"]) == (True, False)
    assert fields["tokenizer.ggml.add_space_prefix"] is False
    assert "{{- tokens[role] ~ message['content'] ~ '<|end|>' -}}" in fields["tokenizer.chat_template"]


# f32 (exact) and Q8_0 in the default suite; f16 and bf16 with the export_tools tests (f16 also runs in llama.cpp)
@pytest.mark.parametrize(
    "dtype", ["float32", "q8_0", *(pytest.param(d, marks=pytest.mark.export_tools) for d in ("float16", "bfloat16"))]
)
def test_file_reads_back(random_run, gguf_file, dtype):
    fields, tensors = read_gguf(gguf_file(dtype))
    ours, tok = load_run(random_run)
    c = ours.config
    assert fields["general.architecture"] == "llama"
    hyper = [c.block_size, c.n_embd, c.n_layer, c.mlp_hidden, c.n_head, c.n_head, c.n_embd // c.n_head]
    keys = "context_length embedding_length block_count feed_forward_length attention.head_count"
    keys = [f"llama.{k}" for k in keys.split()] + ["llama.attention.head_count_kv", "llama.rope.dimension_count"]
    assert [fields[k] for k in keys] == hyper
    assert fields["llama.rope.freq_base"] == c.rope_theta == 500.0
    assert fields["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(c.norm_eps, rel=1e-6)
    assert_vocabulary(fields, tok)

    # the weights: every tensor once, norms in fp32, matrices in the chosen type, equal to ours after undoing the
    # q/k row order; Q8_0 within half a quantization step (a block's max |w| / 127) plus the step's own fp16 rounding
    gtype = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "q8_0": "Q8_0"}[dtype]
    assert fields["general.file_type"] == {"F32": 0, "F16": 1, "BF16": 32, "Q8_0": 7}[gtype]
    state = {k: v.numpy() for k, v in ours.state_dict().items() if k != "lm_head.weight"}  # tied: stored once
    assert sorted(tensors) == sorted(map(gguf_name, state)) and "output.weight" not in tensors
    for name, mine in state.items():
        kind, got = tensors[gguf_name(name)]
        assert kind == ("F32" if mine.ndim == 1 else gtype), name
        got = got.reshape(mine.shape)
        if ".attn.c_q." in name or ".attn.c_k." in name:  # llama.cpp's interleaved order back to rotate-half
            got = got.reshape(c.n_head, -1, 2, c.n_embd).swapaxes(1, 2).reshape(mine.shape)
        if kind == "Q8_0":
            step = np.abs(mine).reshape(-1, 32).max(1, keepdims=True) / 127
            assert np.all(np.abs(got - mine).reshape(-1, 32) <= 0.56 * step), name
        else:
            rtol = {"F32": 0, "F16": 2**-11, "BF16": 2**-8}[kind]
            np.testing.assert_allclose(got, mine, rtol=rtol, atol=1e-7, err_msg=name)


def test_qk_row_order_gives_llama_cpp_rope_our_scores(random_run, gguf_file):
    """llama.cpp rotates adjacent pairs; model.py rotates halves. With the file's reordered q/k rows, the attention
    scores under llama.cpp's RoPE equal ours at every position pair and head; with our row order they would not."""
    _, tensors = read_gguf(gguf_file("float32"))
    ours, _ = load_run(random_run)
    c = ours.config
    x = torch.randn(c.block_size, c.n_embd, generator=torch.Generator().manual_seed(0))
    attn = ours.transformer.h[1].attn
    wq, wk = attn.c_q.weight.detach(), attn.c_k.weight.detach()
    cos, sin = rope_tables(c.n_embd // c.n_head, c.block_size, c.rope_theta)
    q, k = (apply_rope(heads(x, w, c.n_head)[None], cos, sin)[0] for w in (wq, wk))
    mine = q @ k.transpose(1, 2)  # (n_head, T, T)
    file_wq, file_wk = (torch.tensor(tensors[f"blk.1.attn_{n}.weight"][1]).view(wq.shape) for n in "qk")
    theirs = interleaved_scores(x, file_wq, file_wk, c.n_head, c.rope_theta)
    assert (theirs - mine).abs().max() < 1e-4 * mine.abs().max()
    assert (interleaved_scores(x, wq, wk, c.n_head, c.rope_theta) - mine).abs().max() > 0.1 * mine.abs().max()


def test_bad_input(tiny_data, tmp_path):
    """What a format cannot express is refused by name, writing nothing."""
    tokenizer = tiny_data / "tokenizer.model"
    # Q8_0 quantizes rows in blocks of 32: a width that is not a multiple is refused by name
    odd = tiny_run(tmp_path / "odd", tokenizer, GPTConfig(64, 512, n_layer=1, n_head=4, n_embd=48, mlp_hidden=64))
    proc = export_gguf(odd, tmp_path / "odd.gguf", "--dtype=q8_0", check=False)
    assert_one_line_error(proc, "cannot write q8_0", "n_embd=48", "multiple of 32", "--dtype=float16")
    # a model setting Llama (and GGUF's llama) has no place for
    tiny_run(tmp_path / "softcap", tokenizer, logit_softcap=30.0)
    proc = export_gguf(tmp_path / "softcap", tmp_path / "softcap.gguf", check=False)
    assert_one_line_error(proc, "cannot map to Llama", "logit_softcap")
    # qk_norm (Qwen3) and attn_scale export only as --format=hf: llama.cpp is not run here to test them
    tiny_run(tmp_path / "qk_norm", tokenizer, qk_norm=True)
    proc = export_gguf(tmp_path / "qk_norm", tmp_path / "qk_norm.gguf", check=False)
    assert_one_line_error(proc, "cannot map to Llama in GGUF", "qk_norm=True", "use --format=hf")
    tiny_run(tmp_path / "embed_norm", tokenizer, embed_norm=True)  # an untied head: --format=hf only, as qk_norm
    proc = export_gguf(tmp_path / "embed_norm", tmp_path / "embed_norm.gguf", check=False)
    assert_one_line_error(proc, "cannot map to Llama in GGUF", "embed_norm=True", "use --format=hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["embed_norm", "odd", "qk_norm", "softcap"]


@pytest.mark.export_tools
def test_more_bad_input(tiny_data, tmp_path):
    """Settings that do not go together, an existing file, a missing gguf package; and what works."""
    good = tiny_run(tmp_path / "good", tiny_data / "tokenizer.model")
    hf = ["export.py", f"--out_dir={good}"]
    for args, fragments in [
        ([*hf, "--format=onnx"], ["format=onnx", "hf or gguf"]),
        ([*hf, "--dtype=q8_0"], ["dtype=q8_0", "--format=hf writes float32, bfloat16, float16"]),
        ([*hf, "--format=gguf", f"--hf_dir={tmp_path / 'x'}"], ["hf_dir=", "--format=gguf writes --gguf_file"]),
        ([*hf, f"--gguf_file={tmp_path / 'x.gguf'}"], ["gguf_file=", "add --format=gguf"]),
        ([*hf, "--format=gguf", f"--gguf_file={tmp_path / 'x.bin'}"], ["x.bin", "must end in .gguf"]),
    ]:
        assert_one_line_error(run(*args, check=False), *fragments)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good"]

    # an existing file: refused without --overwrite, replaced with it; never a folder; the default name
    file = tmp_path / "m.gguf"
    export_gguf(good, file, "--dtype=q8_0")
    before = hashlib.sha256(file.read_bytes()).hexdigest()
    assert_one_line_error(export_gguf(good, file, check=False), "already exists", "--overwrite=true")
    assert hashlib.sha256(file.read_bytes()).hexdigest() == before
    export_gguf(good, file, "--overwrite=true")
    assert read_gguf(file)[0]["general.file_type"] == 0 and not list(tmp_path.glob(".m.gguf*"))
    (tmp_path / "dir.gguf").mkdir()
    assert_one_line_error(export_gguf(good, tmp_path / "dir.gguf", "--overwrite=true", check=False), "not a folder")
    proc = run("export.py", f"--out_dir={good}", "--format=gguf", "--dtype=bfloat16")
    assert (good / "good-bf16.gguf").is_file() and "good-bf16.gguf" in proc.stdout

    # an environment without the gguf package
    fake = tmp_path / "no_gguf" / "gguf"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('no gguf here')\n")
    env = {**os.environ, "PYTHONPATH": str(fake.parent)}
    proc = run("export.py", f"--out_dir={good}", "--format=gguf", check=False, env=env)
    assert_one_line_error(proc, 'pip install -e ".[gguf]"')


# ----------------------------------------------------------------------------- llama.cpp itself


@pytest.fixture(scope="module")
def llama_cpp():
    """llama-cpp-python, its models loaded with llama.cpp's plain CPU kernels: the extra buffer types (weights
    repacked for AMX and the like) off, as llama.cpp's `--no-repack` turns them off. On a CPU with AMX (this test's
    Intel Xeon, 2026-12-03) llama-cpp-python 0.3.36 crashed (a segfault) decoding every Q8_0 file, ours at 64 and at
    768 wide alike, in ggml's AMX kernels, as llama.cpp issue 19184 reports for other models; the plain kernels read
    the same files right, and an AMD CPU, which has no AMX, passed this test with the defaults (2026-11-23)."""
    reason = 'llama-cpp-python is not installed: pip install -e ".[export-tools]" (a source build, ~13 min)'
    module = pytest.importorskip("llama_cpp", reason=reason)
    low, default = module.llama_cpp, module.llama_cpp.llama_model_default_params

    def plain_kernels():
        params = default()
        params.use_extra_bufts = False
        return params

    with pytest.MonkeyPatch.context() as patch:
        if "use_extra_bufts" in dict(low.llama_model_params._fields_):  # older bindings have no such field
            patch.setattr(low, "llama_model_default_params", plain_kernels)
        yield module


def open_llama(llama_cpp, file):
    """llama.cpp on the CPU, keeping every position's logits."""
    return closing(llama_cpp.Llama(model_path=str(file), n_ctx=256, logits_all=True, verbose=False, n_threads=2))


def llama_logits(llm, ids):
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


@pytest.mark.export_tools
def test_llama_cpp_f16_greedy_equals_ours_and_q8_0_top1(llama_cpp, random_run, sft_run, tmp_path):
    """The f16 file's greedy tokens equal our fp32 model's, on a random and a trained model; the Q8_0 file's top-1
    agreement with our logits over whole windows of standard-library text is measured (printed, run with -s)."""
    for name, run_dir in [("random", random_run), ("sft", sft_run[0])]:
        ours, tok = load_run(run_dir)
        T = ours.config.block_size
        windows = [[tok.bos_id, *tok.encode(text)][:T] for _, text in stdlib_sample(8)]
        with torch.no_grad():
            reference = [ours.logits(torch.tensor([w]))[0].numpy() for w in windows]
        prompt = (
            chat.render_prompt(tok, CONVERSATIONS[0]) if name == "sft" else [tok.bos_id, *tok.encode("def f(x):\n")]
        )
        mine = ours.generate(torch.tensor([prompt]), 24, temperature=0)[0, len(prompt) :].tolist()
        assert len(set(mine)) > 3  # not one token repeated
        for dtype in ("float16", "q8_0"):
            file = tmp_path / f"{name}-{dtype}.gguf"
            export_gguf(run_dir, file, f"--dtype={dtype}")
            with open_llama(llama_cpp, file) as llm:
                theirs = list(islice(llm.generate(prompt, temp=0.0), 24))
                logits = [llama_logits(llm, w) for w in windows]
            top1 = np.mean(
                np.concatenate([a.argmax(-1) == b.argmax(-1) for a, b in zip(logits, reference, strict=True)])
            )
            diff = max(np.abs(a - b).max() for a, b in zip(logits, reference, strict=True))
            n = sum(map(len, windows))
            print(
                f"{name} {dtype}: greedy equal {theirs == mine}, top-1 agreement {top1:.4f} over {n} positions, "
                f"max |logit diff| {diff:.4f}"
            )
            if dtype == "float16":
                assert theirs == mine, (theirs, mine)
                assert top1 > 0.99 and diff < 0.05
            else:  # llama.cpp quantizes the activations to 8 bits too; a random model's logits lie close together
                assert top1 > (0.8 if name == "random" else 0.95)


@pytest.mark.export_tools
def test_llama_cpp_tokenizer_chat_template_and_stops(llama_cpp, sft_run, tmp_path):
    """llama.cpp encodes text to tokenizer.py's ids (but a literal U+2581, which it reads as a space), parses the
    reserved tokens only when asked, renders the chat template to chat.py's ids and stops at <|end|>."""
    sft, _ = sft_run
    ours, tok = load_run(sft)
    file = tmp_path / "sft.gguf"
    export_gguf(sft, file, "--dtype=float16")
    with open_llama(llama_cpp, file) as llm:
        for text in [*TEXTS, *(text for _, text in stdlib_sample(8))]:
            ids = tok.encode(text.replace(META_SPACE, " "))  # the one difference (docs/export.md)
            assert llm.tokenize(text.encode(), add_bos=False, special=False) == ids
            assert llm.tokenize(text.encode()) == [tok.bos_id, *ids]
            assert llm.detokenize(tok.encode(text)).decode() == text
        special = "<|endoftext|>x<|system|> <|user|> y <|assistant|><|end|>"
        parsed = [1, *tok.encode("x"), 2, *tok.encode(" "), 3, *tok.encode(" y "), 4, 5]
        assert llm.tokenize(special.encode(), add_bos=False, special=True) == parsed
        assert llm.tokenize(special.encode(), add_bos=False, special=False) == tok.encode(special)
        vocab = llama_cpp.llama_model_get_vocab(llm.model)
        stops = [i for i in range(tok.vocab_size) if llama_cpp.llama_vocab_is_eog(vocab, i)]
        assert stops == [tok.bos_id, tok.special[chat.END]]

        # the chat template from the file, as llama-cpp-python's chat handler renders and tokenizes it
        formatter = llama_cpp.llama_chat_format.Jinja2ChatFormatter(
            template=llm.metadata["tokenizer.chat_template"], eos_token="<|endoftext|>", bos_token="<|endoftext|>"
        )
        for messages in CONVERSATIONS:
            messages = [{**m, "content": m["content"].replace(META_SPACE, " ")} for m in messages]
            out = formatter(messages=messages)
            ids = llm.tokenize(out.prompt.encode(), add_bos=not out.added_special, special=True)
            assert ids == chat.render_prompt(tok, messages)

        # a chat completion: our greedy answer, cut at <|end|>, and "stop" when we stopped
        prompt = chat.render_prompt(tok, CONVERSATIONS[0])
        mine = ours.generate(torch.tensor([prompt]), 48, temperature=0)[0, len(prompt) :].tolist()
        end = next((i for i, t in enumerate(mine) if t in stops), None)
        assert end is not None, mine  # the tiny SFT model ends its answer, so the stop is exercised
        reply = llm.create_chat_completion(CONVERSATIONS[0], max_tokens=48, temperature=0.0)
        assert reply["usage"]["prompt_tokens"] == len(prompt)
        assert reply["choices"][0]["message"]["content"] == tok.decode(mine[:end])
        assert reply["choices"][0]["finish_reason"] == "stop"
