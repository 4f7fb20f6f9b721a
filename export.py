"""Export a run to a Hugging Face transformers folder (a standard LlamaForCausalLM with its tokenizer, tested in
transformers, mlx-lm and lm-evaluation-harness) or to one GGUF file (tested in llama.cpp; see docs/export.md).

    python export.py --out_dir=out/tiny_sft --hf_dir=out/tiny_sft_hf            # fp32, exact
    python export.py --out_dir=out/pretrain_137m --hf_dir=hf/137m --dtype=bfloat16
    python export.py --out_dir=out/tiny_sft --hf_dir=out/tiny_sft_hf --overwrite=true   # replace an earlier export
    python export.py --out_dir=out/tiny_sft --format=gguf --dtype=float16       # out/tiny_sft/tiny_sft-f16.gguf
    python export.py --out_dir=out/tiny_sft --format=gguf --dtype=q8_0 --gguf_file=tiny-q8_0.gguf

The folder loads with AutoTokenizer / AutoModelForCausalLM and no custom code (see docs/export.md), and holds:
config.json, generation_config.json, model.safetensors, tokenizer.json, tokenizer_config.json,
special_tokens_map.json, and our tokenizer.model (for tools that read SentencePiece).

Why the mapping is one to one:
- Model: model.py is Llama's layout under nanoGPT's names: pre-norm blocks, RMSNorm with a gain and no bias, bias-free
  linears, SwiGLU (gate, up, down), tied embeddings, one key/value head per query head, 1/sqrt(head_dim) attention.
  Its RoPE rotates halves (x1, x2 -> -x2, x1 over the two halves of each head, frequencies repeated per half), which
  is what transformers' rotate_half does, so the q/k rows keep their order: no permutation as in Meta's -> HF
  conversion, whose checkpoints rotate interleaved pairs. A model setting Llama cannot express is refused, but
  qk_norm, which makes the model a Qwen3 (Llama with q/k norms), attn_scale, folded into q, and embed_norm, folded
  into an embedding of its own with the head untied (HF_ONLY).
- Tokenizer: tokenizer.json (the `tokenizers` format) is built from our SentencePiece BPE: the same vocabulary and
  ids, a merge for every way a piece splits into two pieces, ranked by the piece's score (SentencePiece merges the
  highest-scoring pair first), byte fallback, no normalizer. Pieces keep real spaces where SentencePiece writes
  U+2581, so a literal U+2581 in the text falls back to its three bytes, exactly as tokenizer.py encodes it.
  The reserved tokens are special tokens. `tokenizer(text)` puts <|endoftext|> first, as every training document
  and sample.py's prompts start; `add_special_tokens=False` gives tokenizer.py's encode(text).
- Chat: the chat template renders chat.py's `<|endoftext|> [<|system|> text <|end|>] <|user|> text <|end|>
  <|assistant|> ...`, so apply_chat_template gives the ids sft.py and dpo.py train on. It is exported for every run,
  since every tokenizer prepare.py makes holds the chat tokens; a pretraining run was never trained on it.
  generation_config.json stops at <|endoftext|> (a new document) and at <|end|> (the end of a turn).
- GGUF: the same Llama under llama.cpp's tensor names, with the q/k rows of each head reordered for llama.cpp's
  RoPE, which rotates interleaved pairs. The tokenizer is our SentencePiece model ("llama" in GGUF: pieces, scores,
  token types) with no space prefix. Not llama.cpp's convert_hf_to_gguf.py on the folder: that script is no package,
  and it keeps llama.cpp's default space prefix for our tokenizer, so every text would gain a leading space token.
"""

import dataclasses
import json
import os
import re
import shutil
import sys
from pathlib import Path

import safetensors.torch
import torch

import chat
import checkpoints
import runtime
import tokenizer
from accepts import empty, folder, nonempty, one_of, writable, writable_file
from model import GPTConfig
from runtime import UserError

# -----------------------------------------------------------------------------
out_dir: folder = "out/run"  # run folder written by train.py, train_mlx.py, sft.py or dpo.py
ckpt: nonempty = "best"  # best (falls back to latest), latest, or a checkpoint file name in out_dir
format: one_of("hf", "gguf") = "hf"  # hf: a transformers folder; gguf: one file for llama.cpp (and Ollama, LM Studio)
hf_dir: empty | writable = ""  # folder --format=hf writes; empty = <out_dir>/hf
gguf_file: empty | writable_file = ""  # file --format=gguf writes; empty = <out_dir>/<run folder name>-<type>.gguf
dtype: one_of("float32", "bfloat16", "float16", "q8_0") = "float32"  # 16-bit: half the size; q8_0 (gguf): a quarter
overwrite = False  # replace hf_dir or gguf_file when it holds an earlier export
# -----------------------------------------------------------------------------
runtime.install_error_handler()
config = runtime.configure(
    globals(),
    sys.argv[1:],
    rules=[
        (
            lambda c: c.format == "gguf" or c.dtype != "q8_0",
            "dtype=q8_0 is for --format=gguf; --format=hf writes float32, bfloat16, float16",
        ),
        (
            lambda c: c.format == "gguf" or not c.gguf_file,
            "gguf_file={gguf_file} is written by --format=gguf; add --format=gguf, or give --hf_dir",
        ),
        (
            lambda c: c.format == "hf" or not c.hf_dir,
            "hf_dir={hf_dir} is written by --format=hf; --format=gguf writes --gguf_file",
        ),
    ],
)
GGUF_TYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "q8_0": "Q8_0"}  # dtype -> GGML type
if format == "gguf":
    try:
        import gguf
    except ImportError:
        raise UserError('--format=gguf needs the gguf package: pip install -e ".[gguf]"') from None

# GPTConfig field -> LlamaConfig key. A field missing here is a feature Llama cannot express: export refuses it.
LLAMA_KEYS = {
    "vocab_size": "vocab_size",
    "n_embd": "hidden_size",
    "mlp_hidden": "intermediate_size",
    "n_layer": "num_hidden_layers",
    "n_head": "num_attention_heads",  # num_key_value_heads too: every query head has its own key/value head
    "block_size": "max_position_embeddings",
    "rope_theta": "rope_theta",
    "norm_eps": "rms_norm_eps",
}
# how gradients are computed, or where weights start: not what the trained model computes
TRAINING_ONLY = {"activation_checkpointing", "zero_init"}
DEFAULTS = {f.name: f.default for f in dataclasses.fields(GPTConfig)}  # a feature at its default is off: no setting
# --format=hf only (llama.cpp is not run here to test them in GGUF): qk_norm is Qwen3's q_norm/k_norm (Qwen3ForCausalLM
# is Llama with those two, before RoPE as ours), and attn_scale folds into q (RoPE is linear): into q_norm's weight
# with qk_norm, else into q_proj's rows, each times attn_scale * sqrt(head size) against the 1/sqrt(head size) there.
# embed_norm acts on each token's embedding row alone, so the rows are normed once here into embed_tokens, and the
# head, tied to the rows before the norm, becomes an lm_head of its own (tie_word_embeddings false)
HF_ONLY = {"qk_norm", "attn_scale", "embed_norm"}
# our parameter name inside a block -> Llama's; the tied lm_head.weight is the embedding, stored once
BLOCK_NAMES = {
    "ln_1": "input_layernorm",
    "attn.c_q": "self_attn.q_proj",
    "attn.c_k": "self_attn.k_proj",
    "attn.c_v": "self_attn.v_proj",
    "attn.c_proj": "self_attn.o_proj",
    "ln_2": "post_attention_layernorm",
    "mlp.c_gate": "mlp.gate_proj",
    "mlp.c_fc": "mlp.up_proj",
    "mlp.c_proj": "mlp.down_proj",
}
OUTER_NAMES = {"transformer.wte.weight": "model.embed_tokens.weight", "transformer.ln_f.weight": "model.norm.weight"}
UNK = "<unk>"  # SentencePiece's id 0; byte fallback makes it unreachable from text, so it serves as padding
FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
)
# chat.py's render() and render_prompt() as Jinja: the same role aliases, tokens and order
CHAT_TEMPLATE = f"""{{%- set aliases = {json.dumps(chat.ROLE_ALIASES)} -%}}
{{%- set tokens = {json.dumps(chat.ROLES)} -%}}
{{{{- '{tokenizer.BOS}' -}}}}
{{%- for message in messages -%}}
    {{%- set role = aliases.get(message['role'], message['role']) -%}}
    {{%- if role not in tokens -%}}
        {{{{- raise_exception('unknown role ' ~ message['role'] ~ ' (known: system, user, assistant)') -}}}}
    {{%- endif -%}}
    {{{{- tokens[role] ~ message['content'] ~ '{chat.END}' -}}}}
{{%- endfor -%}}
{{%- if add_generation_prompt -%}}
    {{{{- tokens['assistant'] -}}}}
{{%- endif -%}}
"""


def check_exportable(args):
    """Refuse, in one line, a model setting that neither Llama nor (with qk_norm) Qwen3 computes, or that
    --format=gguf does not write (HF_ONLY)."""
    on = sorted(k for k in set(args) - set(LLAMA_KEYS) - TRAINING_ONLY if k not in DEFAULTS or args[k] != DEFAULTS[k])
    features = [k for k in on if k in DEFAULTS and k not in HF_ONLY]  # model.py's features (issue 37) that are on
    if features:  # all in one line, with the keys that train a run export maps (the recipe configs turn them on)
        off = {k: str(DEFAULTS[k]).lower() if isinstance(DEFAULTS[k], bool) else f"{DEFAULTS[k]:g}" for k in features}
        flags = " ".join(f"--{k}={v}" for k, v in off.items())
        raise UserError(
            f"cannot map to Llama: the run was trained with {', '.join(f'{k}={args[k]!r}' for k in features)}, which "
            f"neither Llama nor Qwen3 computes; train the run with {flags} to export it (docs/export.md)"
        )
    hf_only = [k for k in on if k in HF_ONLY]
    if hf_only and format == "gguf":
        raise UserError(
            f"cannot map to Llama in GGUF: the run was trained with {hf_only[0]}={args[hf_only[0]]!r}, which only "
            f"--format=hf exports (as Qwen3ForCausalLM, or folded into q or the embedding); use --format=hf"
        )
    return [k for k in on if k not in HF_ONLY]


def llama_config(args, tok, eos_ids):
    """config.json of the LlamaForCausalLM (with qk_norm: Qwen3ForCausalLM) that computes what GPT(GPTConfig(**args))
    computes."""
    unmapped = check_exportable(args)
    if unmapped:
        raise UserError(
            f"cannot map to Llama: the checkpoint's model_args has {unmapped[0]}={args[unmapped[0]]!r}, which "
            f"LlamaForCausalLM has no setting for; export.py maps only {', '.join(LLAMA_KEYS)}"
        )
    c = GPTConfig(**args)
    if c.n_embd % c.n_head or c.n_embd // c.n_head % 2:
        raise UserError(
            f"cannot map to Llama: n_embd={c.n_embd} / n_head={c.n_head} is not an even head size, which RoPE needs"
        )
    if tok.vocab_size != c.vocab_size:
        raise UserError(f"the run's tokenizer has {tok.vocab_size} tokens but the checkpoint {c.vocab_size}")
    qwen3 = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "use_sliding_window": False}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **(qwen3 if c.qk_norm else {}),
        **{llama: getattr(c, ours) for ours, llama in LLAMA_KEYS.items()},
        "num_key_value_heads": c.n_head,
        "head_dim": c.n_embd // c.n_head,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": not c.embed_norm,
        "rope_scaling": None,  # transformers < 5 reads rope_theta and this; 5 reads rope_parameters
        "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
        "bos_token_id": tok.bos_id,
        "eos_token_id": eos_ids,
        "pad_token_id": tok.sp.piece_to_id(UNK),
        "torch_dtype": dtype,
    }


def llama_weights(model, torch_dtype):
    """The model's weights under Llama's names, in torch_dtype. The q/k rows keep their order (see the top).
    qk_norm: Qwen3's q_norm and k_norm weights besides; attn_scale folded into q; embed_norm: the normed rows as the
    embedding and the rows as they are as lm_head (HF_ONLY says how)."""
    c, out = model.config, {}
    hd = c.n_embd // c.n_head
    fold = c.attn_scale * hd**0.5 if c.attn_scale else 1.0
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":  # tied: the embedding's tensor, loaded back by tie_word_embeddings, or untied
            if c.embed_norm:
                out[name] = tensor.to(torch_dtype)
            continue
        if name == "transformer.wte.weight" and c.embed_norm:
            tensor = torch.nn.functional.rms_norm(tensor.float(), (c.n_embd,), eps=c.norm_eps)
        block = re.fullmatch(r"transformer\.h\.(\d+)\.(.+)\.weight", name)
        llama = f"model.layers.{block[1]}.{BLOCK_NAMES[block[2]]}.weight" if block else OUTER_NAMES[name]
        out[llama] = (tensor * (fold if llama.endswith("q_proj.weight") and not c.qk_norm else 1.0)).to(torch_dtype)
        if llama.endswith("q_proj.weight") and c.qk_norm:
            out[llama.replace("q_proj", "q_norm")] = torch.full((hd,), fold, dtype=torch_dtype)
            out[llama.replace("q_proj", "k_norm")] = torch.ones(hd, dtype=torch_dtype)
    return {k: v.contiguous() for k, v in out.items()}


def tokenizer_json(tok):
    """Our SentencePiece BPE as a `tokenizers` BPE model that encodes every text to the same ids (see the top)."""
    sp = tok.sp
    reserved = {i for i in range(sp.vocab_size()) if sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i)}
    vocab, pieces = {}, {}  # every token -> id; the pieces text can merge into -> id
    for i in range(sp.vocab_size()):
        piece = sp.id_to_piece(i) if i in reserved else sp.id_to_piece(i).replace(tokenizer.META_SPACE, " ")
        if piece in vocab:
            raise UserError(f"the tokenizer has {piece!r} twice; it was not made by prepare.py")
        vocab[piece] = i
        if i not in reserved:
            pieces[piece] = i
    # Best score first. SentencePiece breaks a tie between two splits of one piece by position, a rank cannot: the
    # two could differ only where both splits meet on overlapping symbols, which never happened on the standard
    # library (tests/test_export.py, and 115M tokens of stdlib and site-packages checked once)
    merges = sorted(
        (-sp.get_score(i), i, pieces[p[:k]], [p[:k], p[k:]])
        for p, i in pieces.items()
        for k in range(1, len(p))
        if p[:k] in pieces and p[k:] in pieces
    )
    special = [i for i in sorted(reserved) if not sp.is_byte(i)]
    bos = {"SpecialToken": {"id": tokenizer.BOS, "type_id": 0}}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            dict(id=i, content=sp.id_to_piece(i), single_word=False, lstrip=False, rstrip=False, normalized=False)
            | {"special": True}
            for i in special
        ],
        "normalizer": None,
        "pre_tokenizer": None,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, bos, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {tokenizer.BOS: {"id": tokenizer.BOS, "ids": [tok.bos_id], "tokens": [tokenizer.BOS]}},
        },
        "decoder": {"type": "Sequence", "decoders": [{"type": "ByteFallback"}, {"type": "Fuse"}]},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": UNK,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": True,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": [m[-1] for m in merges],
        },
    }


def tokenizer_config(tok, block_size):
    """tokenizer_config.json: the special tokens by role, <|endoftext|> first in every encoding, the chat template."""
    special = {"bos_token": tokenizer.BOS, "eos_token": tokenizer.BOS, "unk_token": UNK, "pad_token": UNK}
    extra = [t for t in tok.special if t != tokenizer.BOS]
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",  # reads tokenizer.json as written: no conversion, no slow class
        **special,
        "additional_special_tokens": extra,
        "model_input_names": ["input_ids", "attention_mask"],  # no token_type_ids: generate() would refuse them
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": block_size,
        "added_tokens_decoder": {
            str(tok.sp.piece_to_id(t)): dict(content=t, lstrip=False, normalized=False, rstrip=False, single_word=False)
            | {"special": True}
            for t in [UNK, *tok.special]
        },
        "chat_template": CHAT_TEMPLATE,
    }, {**special, "additional_special_tokens": extra}


def check_target(target):
    """Refuse to write over anything but an earlier export of this format, and over that without --overwrite."""
    if format == "gguf" and target.suffix != ".gguf":
        raise UserError(f"gguf_file={target}: the file name must end in .gguf")
    if not target.exists():
        return
    if not overwrite:
        flag = "--hf_dir" if format == "hf" else "--gguf_file"
        raise UserError(f"{target} already exists; pass --overwrite=true to replace it, or choose another {flag}")
    if format == "gguf":
        if not target.is_file():
            raise UserError(f"{target} is not a file; remove it or choose another --gguf_file")
        return
    foreign = sorted(p.name for p in target.iterdir() if p.name not in FILES) if target.is_dir() else [target.name]
    if foreign:  # --overwrite replaces an earlier export, never a folder of other things
        raise UserError(
            f"{target} holds {foreign[0]}, which export.py does not write; remove it or choose another --hf_dir"
        )


def write_hf(folder, model, tok, hf_config, tokenizer_path):
    """The transformers folder: weights, configs, tokenizer.json and its settings, our tokenizer.model."""
    folder.mkdir()
    weights = llama_weights(model, getattr(torch, dtype))
    (folder / "model.safetensors").write_bytes(safetensors.torch.save(weights, metadata={"format": "pt"}))
    eos_ids = hf_config["eos_token_id"]
    generation = {"bos_token_id": tok.bos_id, "eos_token_id": eos_ids, "pad_token_id": hf_config["pad_token_id"]}
    tok_config, special_map = tokenizer_config(tok, model.config.block_size)
    for name, content in [
        ("config.json", hf_config),
        ("generation_config.json", generation),
        ("tokenizer.json", tokenizer_json(tok)),
        ("tokenizer_config.json", tok_config),
        ("special_tokens_map.json", special_map),
    ]:
        (folder / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    shutil.copyfile(tokenizer_path, folder / "tokenizer.model")


def check_q8_0(c):
    """Q8_0 quantizes each weight row in blocks of 32, and every row is n_embd or mlp_hidden long."""
    for name in ("n_embd", "mlp_hidden"):
        if getattr(c, name) % 32:
            raise UserError(
                f"cannot write q8_0: {name}={getattr(c, name)} is not a multiple of 32, the length of a Q8_0 block; "
                f"export --dtype=float16 or bfloat16 instead"
            )


def gguf_vocab(writer, tok):
    """Our SentencePiece model as GGUF's "llama" tokenizer, its special tokens by role and the chat template."""
    sp, T = tok.sp, gguf.TokenType
    kinds = [(sp.is_unknown, T.UNKNOWN), (sp.is_control, T.CONTROL), (sp.is_byte, T.BYTE), (sp.is_unused, T.UNUSED)]
    types = [next((t for is_kind, t in kinds if is_kind(i)), T.NORMAL) for i in range(sp.vocab_size())]
    writer.add_tokenizer_model("llama")  # SentencePiece: merges by score, byte fallback
    writer.add_tokenizer_pre("default")
    writer.add_token_list([sp.id_to_piece(i) for i in range(sp.vocab_size())])
    writer.add_token_scores([sp.get_score(i) for i in range(sp.vocab_size())])
    writer.add_token_types(types)  # CONTROL: parsed from text only when asked (chat templates), never merged into
    writer.add_bos_token_id(tok.bos_id)
    writer.add_eos_token_id(tok.bos_id)  # a new document; with <|end|> below, the tokens generation stops at
    writer.add_eot_token_id(tok.special[chat.END])  # set, not left to llama.cpp's guess by name
    writer.add_unk_token_id(sp.unk_id())
    writer.add_pad_token_id(sp.unk_id())
    writer.add_add_bos_token(True)  # <|endoftext|> first, as every training document starts
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(False)  # llama.cpp's default for SentencePiece is a leading space; prepare.py's none
    writer.add_chat_template(CHAT_TEMPLATE)


def write_gguf(file, model, tok):
    """One GGUF file: hyperparameters, tokenizer, weights under llama.cpp's names in the chosen GGML type."""
    c, qtype = model.config, gguf.GGMLQuantizationType[GGUF_TYPES[dtype]]
    file_types = {"F32": "ALL_F32", "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16", "Q8_0": "MOSTLY_Q8_0"}
    writer = gguf.GGUFWriter(file, "llama")
    writer.add_name(Path(out_dir).resolve().name)
    for add, value in [
        (writer.add_context_length, c.block_size),
        (writer.add_embedding_length, c.n_embd),
        (writer.add_block_count, c.n_layer),
        (writer.add_feed_forward_length, c.mlp_hidden),
        (writer.add_head_count, c.n_head),
        (writer.add_head_count_kv, c.n_head),
        (writer.add_rope_dimension_count, c.n_embd // c.n_head),
        (writer.add_rope_freq_base, c.rope_theta),
        (writer.add_layer_norm_rms_eps, c.norm_eps),
        (writer.add_vocab_size, c.vocab_size),
        (writer.add_file_type, gguf.LlamaFileType[file_types[qtype.name]]),
        (writer.add_quantization_version, gguf.GGML_QUANT_VERSION),
    ]:
        add(value)
    gguf_vocab(writer, tok)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, c.n_layer)  # Hugging Face name -> llama.cpp's
    for name, tensor in llama_weights(model, torch.float32).items():
        w = tensor.numpy()
        if name.endswith(("q_proj.weight", "k_proj.weight")):  # rotate-half rows -> llama.cpp's interleaved pairs
            w = w.reshape(c.n_head, 2, -1, c.n_embd).swapaxes(1, 2).reshape(c.n_embd, c.n_embd)
        kind = gguf.GGMLQuantizationType.F32 if w.ndim == 1 else qtype  # norms stay fp32, as llama.cpp keeps them
        writer.add_tensor(names.get_name(name, (".weight",)), gguf.quants.quantize(w, kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# ----------------------------------------------------------------------------- target
if format == "hf":
    target = Path(hf_dir or Path(out_dir) / "hf")
else:
    target = Path(gguf_file or Path(out_dir) / f"{Path(out_dir).resolve().name}-{GGUF_TYPES[dtype].lower()}.gguf")
check_target(target)

# ----------------------------------------------------------------------------- model and tokenizer
path = checkpoints.find_checkpoint(out_dir, ckpt)
checkpoint = checkpoints.load_checkpoint(path)
tokenizer_path = tokenizer.find_tokenizer(out_dir)
if tokenizer_path is None:
    raise UserError(f"{out_dir} has no tokenizer.model; copy the data folder's tokenizer into the run folder")
if tokenizer_path.suffix != ".model":
    raise UserError(f"{tokenizer_path}: only SentencePiece tokenizers made by prepare.py can be exported")
try:
    tok = tokenizer.load_tokenizer(tokenizer_path)
except ValueError as e:  # a SentencePiece model without our reserved tokens
    raise UserError(f"{tokenizer_path}: {e}") from None
eos_ids = [tok.bos_id, tok.special[chat.END]]  # a new document, the end of a turn
hf_config = llama_config(checkpoint["model_args"], tok, eos_ids)
if dtype == "q8_0":
    check_q8_0(GPTConfig(**checkpoint["model_args"]))
model = checkpoints.build_model(checkpoint, path)

# ----------------------------------------------------------------------------- write
# everything goes to a temporary name beside the target, renamed into place at the end: a failure leaves nothing
target.parent.mkdir(parents=True, exist_ok=True)
tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
try:
    if format == "hf":
        write_hf(tmp, model, tok, hf_config, tokenizer_path)
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        if target.exists():
            os.rename(target, old)
        os.rename(tmp, target)
        if old.exists():
            shutil.rmtree(old)
    else:
        write_gguf(tmp, model, tok)
        os.replace(tmp, target)
finally:
    if tmp.is_dir():
        shutil.rmtree(tmp)
    elif tmp.exists():
        tmp.unlink()
n = sum(p.numel() for p in model.parameters())
print(f"exported {path} ({n / 1e6:.2f}M parameters, {dtype}) and {tokenizer_path.name} to {target}")
