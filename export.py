"""Export a run to a Hugging Face transformers folder: a standard LlamaForCausalLM with its tokenizer.

    python export.py --out_dir=out/tiny_sft --hf_dir=out/tiny_sft_hf            # fp32, exact
    python export.py --out_dir=out/pretrain_137m --hf_dir=hf/137m --dtype=bfloat16
    python export.py --out_dir=out/tiny_sft --hf_dir=out/tiny_sft_hf --overwrite=true   # replace an earlier export

The folder loads with AutoTokenizer / AutoModelForCausalLM and no custom code (see README, Export), and holds:
config.json, generation_config.json, model.safetensors, tokenizer.json, tokenizer_config.json,
special_tokens_map.json, and our tokenizer.model (for tools that read SentencePiece, such as llama.cpp's converter).

Why the mapping is one to one:
- Model: model.py is Llama's layout under nanoGPT's names: pre-norm blocks, RMSNorm with a gain and no bias, bias-free
  linears, SwiGLU (gate, up, down), tied embeddings, one key/value head per query head, 1/sqrt(head_dim) attention.
  Its RoPE rotates halves (x1, x2 -> -x2, x1 over the two halves of each head, frequencies repeated per half), which
  is what transformers' rotate_half does, so the q/k rows keep their order: no permutation as in Meta's -> HF
  conversion, whose checkpoints rotate interleaved pairs. A model setting Llama cannot express is refused.
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
"""

import json
import os
import re
import shutil
import sys
from pathlib import Path

import safetensors.torch
import torch

import chat
import runtime
import tokenizer
from model import GPTConfig
from runtime import UserError

# -----------------------------------------------------------------------------
out_dir = "out/run"  # run folder written by train.py, train_mlx.py, sft.py or dpo.py
ckpt = "best"  # best (falls back to latest), latest, or a checkpoint file name in out_dir
hf_dir = ""  # folder to write; empty = <out_dir>/hf
dtype = "float32"  # precision of the exported weights: float32 (exact), bfloat16 or float16 (half the size)
overwrite = False  # replace hf_dir when it holds an earlier export
# -----------------------------------------------------------------------------
runtime.install_error_handler()
config = runtime.configure(globals(), sys.argv[1:])
if dtype not in ("float32", "bfloat16", "float16"):
    raise UserError(f"dtype={dtype}: expected float32, bfloat16 or float16")

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
TRAINING_ONLY = {"activation_checkpointing"}  # changes how gradients are computed, not what the model computes
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


def llama_config(args, tok, eos_ids):
    """config.json of the LlamaForCausalLM that computes what GPT(GPTConfig(**args)) computes."""
    unmapped = sorted(set(args) - set(LLAMA_KEYS) - TRAINING_ONLY)
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
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **{llama: getattr(c, ours) for ours, llama in LLAMA_KEYS.items()},
        "num_key_value_heads": c.n_head,
        "head_dim": c.n_embd // c.n_head,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": True,
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


def llama_weights(model):
    """The model's weights under Llama's names, in the export dtype. The q/k rows keep their order (see the top)."""
    out = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":  # tied: the same tensor as the embedding, loaded back by tie_word_embeddings
            continue
        block = re.fullmatch(r"transformer\.h\.(\d+)\.(.+)\.weight", name)
        llama = f"model.layers.{block[1]}.{BLOCK_NAMES[block[2]]}.weight" if block else OUTER_NAMES[name]
        out[llama] = tensor.to(getattr(torch, dtype)).contiguous()
    return out


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


# ----------------------------------------------------------------------------- target
target = Path(hf_dir or Path(out_dir) / "hf")
if target.exists() and not overwrite:
    raise UserError(f"{target} already exists; pass --overwrite=true to replace it, or choose another --hf_dir")
if target.exists():
    foreign = sorted(p.name for p in target.iterdir() if p.name not in FILES) if target.is_dir() else [target.name]
    if foreign:  # --overwrite replaces an earlier export, never a folder of other things
        raise UserError(
            f"{target} holds {foreign[0]}, which export.py does not write; remove it or choose another --hf_dir"
        )

# ----------------------------------------------------------------------------- model and tokenizer
path = runtime.find_checkpoint(out_dir, ckpt)
checkpoint = runtime.load_checkpoint(path)
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
model = runtime.build_model(checkpoint, path)

# ----------------------------------------------------------------------------- write
# everything goes into a temporary folder beside the target, renamed into place at the end: a failure leaves nothing
target.parent.mkdir(parents=True, exist_ok=True)
tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
try:
    tmp.mkdir()
    (tmp / "model.safetensors").write_bytes(safetensors.torch.save(llama_weights(model), metadata={"format": "pt"}))
    generation = {"bos_token_id": tok.bos_id, "eos_token_id": eos_ids, "pad_token_id": hf_config["pad_token_id"]}
    tok_config, special_map = tokenizer_config(tok, model.config.block_size)
    for name, content in [
        ("config.json", hf_config),
        ("generation_config.json", generation),
        ("tokenizer.json", tokenizer_json(tok)),
        ("tokenizer_config.json", tok_config),
        ("special_tokens_map.json", special_map),
    ]:
        (tmp / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    shutil.copyfile(tokenizer_path, tmp / "tokenizer.model")
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        os.rename(target, old)
    os.rename(tmp, target)
    if old.exists():
        shutil.rmtree(old)
finally:
    if tmp.exists():
        shutil.rmtree(tmp)
n = sum(p.numel() for p in model.parameters())
print(f"exported {path} ({n / 1e6:.2f}M parameters, {dtype}) and {tokenizer_path.name} to {target}")
