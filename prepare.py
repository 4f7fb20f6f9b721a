"""Build a token dataset: documents -> tokenizer -> memmap .bin shards, resumably, with a manifest.

    python prepare.py                                        # default corpus: this Python's standard library
    python prepare.py --corpus=python --vocab_size=32000     # ... and every installed package's source
    python prepare.py --input=notes/ --data_dir=data/notes   # local .txt (a document per file), .jsonl, .parquet
    python prepare.py --dataset=EliMC/Ultra-FineWeb --split=en --text_field=content --score_field=score \\
        --score_min=0.8 --vocab_size=32000 --model_config=config/pretrain_137m.py --data_dir=data/pretrain
    python prepare.py --model_config=config/pretrain_137m.py --plan_only=true    # the token budget, nothing else

Hub datasets and local files go through one code path, datasets.load_dataset(..., streaming=True). The
tokenizer is trained on the first --tokenizer_docs documents that pass the filter (or reused: --tokenizer=PATH
or --tokenizer=gpt2). Documents go to validation when a hash of their name (file path, or position in the
stream) says so, until the validation split holds --val_tokens. Shards hold --shard_tokens tokens each.

Stop it at any moment and run the same command again: it continues after the last finished shard, with no
document lost or written twice. Each shard is written under a temporary name and renamed, then the tokens that no
shard holds yet (pending_*.tokens) and manifest.json (settings, document counts, each shard's token count and SHA-256,
the resume point).
"""

import atexit
import glob
import hashlib
import itertools
import json
import math
import re
import sys
import time
import zlib
from pathlib import Path

import numpy as np
from tqdm import tqdm

import chat
import disk
import pysource
import runtime
from accepts import above, any_text, at_least, auto, between, empty, file, finite, folder, nonempty, one_of, writable
from quality import Filters, Judges, round_trips, rule_kind, select_rules
from runtime import UserError
from shards import open_shard, read_header, token_dtype, write_shard, write_split
from tokenizer import TOKENIZER_FILES, TiktokenTokenizer, Tokenizer, find_tokenizer, load_tokenizer, train_tokenizer

# what --tokenizer takes, in words that say what a user who gave a missing path should give instead
TOKENIZER = (one_of("", "gpt2") | file).saying(
    '"" (train one), gpt2, or a tokenizer.model file that exists (--mode=sft/dpo: the base run\'s, '
    "out/RUN/tokenizer.model)"
)
# -----------------------------------------------------------------------------
input: any_text = ""  # local file, folder or glob of .txt/.jsonl/.parquet; empty (and no --dataset) = --corpus
corpus: one_of("stdlib", "python") = "stdlib"  # local source with no --input/--dataset: python = stdlib + packages
max_file_bytes: at_least(1) = 1_000_000  # corpus=python: larger .py files (generated tables, bundles) skipped
dataset: any_text = ""  # Hugging Face dataset, streamed (e.g. EliMC/Ultra-FineWeb, HuggingFaceFW/fineweb, allenai/c4)
dataset_config: any_text = ""  # the dataset's configuration, if it has several (e.g. "en" for allenai/c4)
split: nonempty = "train"  # split to stream (Ultra-FineWeb: en)
text_field: nonempty = "text"  # field holding the document (Ultra-FineWeb: content)
score_field: any_text = ""  # numeric quality field to filter on (Ultra-FineWeb: score); empty = keep every document
score_min: finite = 0.0  # keep documents whose score_field >= this (the seed kept Ultra-FineWeb scores >= 0.8)
data_dir: empty | writable = ""  # output folder; empty = data/<corpus>, data/<input name> or data/<dataset name>
vocab_size: between(1, 2**20) = 4096  # size of a trained tokenizer: 4096 suits the CPU demo, 32000 the reference run
tokenizer: TOKENIZER = ""  # reuse a tokenizer.model, or tiktoken's gpt2; empty = train one
tokenizer_docs: between(1, 10_000_000) = 20000  # documents from the start of the stream to train the tokenizer on
val_permille: between(0, 1000) = 50  # documents per 1000 that go to validation (by a hash of their name) ...
val_tokens: at_least(0) = 10_000_000  # ... until the validation split holds this many tokens
shard_tokens: at_least(1) = 100_000_000  # tokens per .bin shard (200 MB as uint16)
max_tokens: at_least(0) = 0  # stop after this many training tokens; 0 = the whole stream, or the plan's target
model_config: empty | file = ""  # a train.py config file: target tokens_per_param x its parameter count
tokens_per_param: above(0) = 20.0  # Chinchilla's 20 tokens per parameter
plan_only = False  # print the plan and exit
max_shards: at_least(0) = 0  # write at most this many shards, then stop (run again to go on); 0 = no limit
num_threads: between(0, 128) = 0  # processes that tokenize and filter documents (sft/dpo: parse files); 0 = all cores
batch_docs: between(1, 100_000) = 1024  # documents read and handed to the num_threads processes at a time
overwrite = False  # replace what data_dir holds
# SFT and DPO data (--mode=sft, --mode=dpo): conversations with a loss mask, or preference pairs; see chat.py
mode: one_of("pretrain", "sft", "dpo") = "pretrain"  # sft: `messages`, oasst1 trees; dpo: prompt/chosen/rejected
messages_field: nonempty = "messages"  # field holding a [{role, content}] list (HuggingFaceH4/ultrachat_200k: messages)
lang: any_text = ""  # oasst1: keep only messages in this language (e.g. en); empty = all
block_size: between(1, 4096) = 1024  # sft: longer conversations dropped; dpo: longer pairs cut (chat.fit_pair); counted
task: one_of("docstring", "code", "both") = "docstring"  # local corpus: what does f do? (docstring), write f, or both
code_scope: one_of("self_contained", "all") = "self_contained"  # coding task's functions: self_contained: stdlib only
sample_from: empty | folder = ""  # --mode=dpo, coding task: an SFT run whose answers are the rejected ones (GPU)
sample_batch: at_least(1) = 128  # --sample_from: answers decoded at once (reference.sh: 512, as eval.py's gen_batch)
sample_n: between(1, 64) = 1  # --sample_from: answers to each request with examples; > 1: passing against failing
sample_unjudged: one_of("own", "written") = "own"  # --sample_from, a request with no doctest verdict: written: its pair
sample_own_only = False  # --sample_from with sample_n > 1: only pairs of the run's own answers replace written ones
sample_others: one_of("written", "none") = "written"  # --sample_own_only: the other pairs; none: the run's own alone
sample_pairs: between(1, 64) = 1  # --sample_n > 1: pairs of the run's own answers a request may give (distinct ones)
# filters of the training split (quality.py); validation documents are kept as they are, so that runs made with and
# without them are scored on the same held-out set, and enter the near-duplicate index first (their near-copies leave
# training). auto: on for the local Python corpus, where the reference run measured them (docs/data.md), off for
# text files and datasets (--quality=web and --near_dup=0.7 turn them on)
quality: one_of("off", "auto", "code", "web") = "auto"  # auto: code on --corpus, else off; code, web: quality.py
quality_skip: any_text = ""  # rules left out, comma-separated (e.g. literals,long_lines): see quality.py
near_dup: auto | 0.0 | float & between(0.5, 0.95) = "auto"  # near-copy Jaccard cutoff; 0: off; auto: 0.7 on --corpus
dedup_ngram: between(1, 64) = 5  # tokens per MinHash shingle, for near_dup
# -----------------------------------------------------------------------------
runtime.install_error_handler()
config = runtime.configure(  # quality_skip's names: rules of the kind --quality picks
    globals(),
    sys.argv[1:],
    rules=[
        lambda c: select_rules(c.quality, c.quality_skip, bool(c.input or c.dataset)),
        (
            lambda c: not c.sample_own_only or (c.sample_from and c.sample_n > 1),
            "sample_own_only=true needs its run's answers: --sample_from=SFT_RUN and --sample_n=N, N >= 2; add both",
        ),
        (
            lambda c: c.sample_others == "written" or c.sample_own_only,
            "sample_others=none keeps the run's own pairs alone, which --sample_own_only=true sets apart; add it",
        ),
        (
            lambda c: c.sample_pairs == 1 or (c.sample_from and c.sample_n > 1),
            "sample_pairs > 1 needs several answers of the run to each request: --sample_from=SFT_RUN and "
            "--sample_n=N, N >= 2; add both",
        ),
    ],
)
RUN_KEYS = ("data_dir", "plan_only", "max_shards", "num_threads", "batch_docs", "sample_batch", "overwrite")
# the corpus keys are recorded only for corpus=python: folders made before they existed still resume
CHAT_KEYS = ("task", "code_scope", "sample_from")  # recorded only for --mode=sft/dpo: older folders still resume
FILTER_KEYS = ("quality", "quality_skip", "near_dup", "dedup_ngram")  # recorded only when a filter is on, likewise
local = not (input or dataset)
# the processes that judge documents (quality.Judges): forked, so Linux only, as chat.pool_size says why
n_workers = 1 if sys.platform != "linux" else num_threads or runtime.cores()
config["quality"] = quality = rule_kind(quality, not local)  # recorded as resolved: auto and code are one folder
config["near_dup"] = near_dup = (0.7 if local else 0.0) if near_dup == "auto" else near_dup
filtering = mode == "pretrain" and (quality != "off" or near_dup > 0)
SETTINGS = [
    k
    for k in config
    if k not in RUN_KEYS
    and (corpus == "python" or k not in ("corpus", "max_file_bytes"))
    and (mode != "pretrain" or k not in CHAT_KEYS)
    and (filtering or k not in FILTER_KEYS)
    and (k != "sample_n" or sample_n > 1)  # recorded when it changes the pairs: folders made before it still resume
    and (k != "sample_unjudged" or sample_unjudged != "own")
    and (k != "sample_own_only" or sample_own_only)
    and (k != "sample_others" or sample_others != "written")
    and (k != "sample_pairs" or sample_pairs > 1)
]
rules = select_rules(quality if mode == "pretrain" else "off", quality_skip, not local)


def open_stream():
    """(rows, description, text field). rows can be iterated more than once (a peek, the tokenizer's sample, the
    main pass): files read as they are reached for --corpus, a streaming IterableDataset for files and the hub."""
    if not input and not dataset:
        stdlib = f"python {sys.version.split()[0]} standard library"
        if corpus == "stdlib":
            return pysource.stdlib_rows(), stdlib, "text"
        files, counts = pysource.python_files(max_bytes=max_file_bytes)
        return (
            pysource.FileRows(files),
            f"{stdlib} and site-packages: {pysource.describe(counts, max_file_bytes)}",
            "text",
        )
    import datasets  # imported here: the default corpus needs no pyarrow

    if input:
        path = Path(input)
        files = (
            sorted(str(p) for p in path.rglob("*") if p.is_file())
            if path.is_dir()
            else sorted(glob.glob(input, recursive=True))
        )
        kinds = {Path(f).suffix for f in files} & {".txt", ".jsonl", ".json", ".parquet"}
        if not files or not kinds:
            raise UserError(f"--input={input}: no .txt, .jsonl or .parquet files there")
        if len(kinds) > 1:
            raise UserError(f"--input={input} mixes {sorted(kinds)}; point it at one kind of file")
        kind = kinds.pop()
        files = [f for f in files if f.endswith(kind)]
        builder, extra = {".txt": ("text", {"sample_by": "document"}), ".parquet": ("parquet", {})}.get(
            kind, ("json", {})
        )
        ds = ReadRows(datasets.load_dataset(builder, data_files=files, split="train", streaming=True, **extra), input)
        return ds, f"{len(files)} local {kind} file(s) under {input}", "text" if kind == ".txt" else text_field
    try:
        ds = datasets.load_dataset(dataset, dataset_config or None, split=split, streaming=True)
    except (ConnectionError, OSError) as e:
        raise UserError(
            f"cannot reach the Hugging Face hub for {dataset!r} ({type(e).__name__}); check the network, or "
            f"download the files and pass them with --input=PATH (.parquet/.jsonl/.txt)"
        ) from None
    except ValueError as e:  # e.g. an unknown split
        raise UserError(f"{dataset}: {str(e).splitlines()[0]}") from None
    return ds, f"{dataset} ({dataset_config or 'default'}, split {split})", text_field


class ReadRows:
    """The rows of the user's files, iterable again and again as the dataset; a line that is not JSON or a file
    that is not parquet, met wherever in the stream, is a UserError naming --input (pyarrow's ArrowInvalid is a
    ValueError)."""

    def __init__(self, ds, where):
        self.ds, self.where = ds, where

    def skip(self, n):  # a resumed run starts past the rows it has done
        return ReadRows(self.ds.skip(n), self.where)

    def __iter__(self):
        try:
            yield from self.ds
        except ValueError as e:
            raise UserError(f"--input={self.where}: a file cannot be read ({str(e).splitlines()[0][:200]})") from None


def check_fields(rows, field):
    """Fail early, naming the fields the documents do have, when the text or score field is missing."""
    first = next(iter(rows), None)
    if first is None:
        raise UserError("the source holds no documents")
    for name, flag in [(field, "--text_field"), (score_field, "--score_field")]:
        if name and name not in first:
            raise UserError(f"the documents have no field {name!r} (they have {sorted(first)}); set {flag}")


def documents(rows, field, first_row=0):
    """(row index, name, text or None) for every row from first_row on; None when empty or filtered out.
    A row's name (its file path, or its index in the stream) decides its split, so it must not shift on resume."""
    for i, row in enumerate(rows, start=first_row):
        text = row[field]
        if score_field and (row[score_field] is None or row[score_field] < score_min):
            text = None
        yield i, row.get("name", str(i)), text if text else None


def get_plan():
    """Parameters of --model_config's model and the token budget they call for."""
    from dataclasses import fields

    import torch

    from model import GPT, GPTConfig

    values = {}
    exec(compile(Path(model_config).read_text(), model_config, "exec"), {}, values)
    args = {f.name: values[f.name] for f in fields(GPTConfig) if f.name in values}
    args.setdefault("vocab_size", vocab_size)
    with torch.device("meta"):
        n_params = GPT(GPTConfig(**args)).num_params()
    target = int(tokens_per_param * n_params)
    itemsize = np.dtype(token_dtype(args["vocab_size"])).itemsize
    return {
        "model_config": model_config,
        "parameters": n_params,
        "tokens_per_param": tokens_per_param,
        "target_tokens": target,
        "shards": math.ceil(target / shard_tokens),
        "disk_gb": target * itemsize / 1e9,
    }


def get_tokenizer(out, rows, field):
    """The folder's tokenizer if it has one, a named/reused one, or one trained on the stream's first documents."""
    existing = find_tokenizer(out)
    if existing is not None:
        return load_tokenizer(existing)
    if tokenizer == "gpt2":
        try:
            return TiktokenTokenizer("gpt2")
        except ValueError as e:  # its files are downloaded on first use
            raise UserError(str(e)) from None
    if tokenizer:  # a file that exists: configure checked it
        return Tokenizer(tokenizer)
    t0 = time.time()
    texts, docs = [], (text for _, _, text in documents(rows, field) if text)
    with Judges(None, rules, near_dup, dedup_ngram, n_workers) as rule_judges:  # no tokenizer yet: the rules only
        while len(texts) < tokenizer_docs and (batch := list(itertools.islice(docs, batch_docs))):
            verdicts = rule_judges.judged(batch)
            texts += [text for text, (_, rule, _) in zip(batch, verdicts, strict=True) if rule is None]
    del texts[tokenizer_docs:]
    if not texts:
        raise UserError(f"no document passed the filter ({score_field} >= {score_min}); lower --score_min")
    lines = [line for text in texts for line in text.split("\n") if line.strip()]
    try:
        tok = Tokenizer(model_proto=train_tokenizer(lines, vocab_size))
    except RuntimeError as e:  # SentencePiece refuses a vocabulary larger than the text supports, or too small
        # to hold every character it must keep ("Vocabulary size is smaller than required_chars. 300 vs 307.")
        why = str(e).splitlines()[-1]
        need = re.search(r"smaller than required_chars\. \d+ vs (\d+)", why)
        advice = f"raise --vocab_size to at least {need[1]}" if need else "lower --vocab_size"
        raise UserError(f"tokenizer training failed: {why.split(' Increase vocab_size')[0]}; {advice}") from None
    with Judges(tok, rules, near_dup, dedup_ngram, n_workers) as tok_judges:
        bad = sum(not same for same in tok_judges.map(round_trips, texts))
    if bad:
        raise UserError(f"the new tokenizer does not round-trip {bad} of its training documents; please report it")
    print(
        f"tokenizer: trained a {tok.vocab_size}-token BPE on {len(texts)} documents in {time.time() - t0:.1f}s "
        f"(each decodes back exactly)"
    )
    return tok


def is_val(name):
    return zlib.crc32(name.encode()) % 1000 < val_permille


def validation_documents(rows, field):
    """(row, token ids) of the documents that will go to validation, in stream order, for the near-duplicate index to
    hold before the pass. The local corpus reads only the files whose name sends them there; a stream, whose rows are
    named by their place or a field of their own, is read until validation is full (a prefix: ~200M tokens of a hub
    dataset at the defaults) or it ends, tokenizing only validation's documents."""
    if isinstance(rows, pysource.FileRows):
        index = [i for i, (name, _) in enumerate(rows.files) if is_val(name)]
        picked = documents(pysource.FileRows([rows.files[i] for i in index]), field)
        docs = ((i, text) for i, (_, _, text) in zip(index, picked, strict=True) if text)
    else:
        docs = ((i, text) for i, name, text in documents(rows, field) if text and is_val(name))
    held = 0  # validation's tokens so far: the main pass's counts["val_assigned"]
    while held < val_tokens and val_permille and (batch := list(itertools.islice(docs, batch_docs))):
        for (row, _), (ids, _, sig) in zip(batch, judges.judged([t for _, t in batch]), strict=True):
            if held >= val_tokens:
                return
            held += len(ids)
            yield row, ids, sig


def split_of(i):
    """The split of the i-th conversation or pair of --mode=sft/dpo."""
    return "val" if is_val(str(i)) else "train"


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def save_manifest():
    disk.write_atomic(out / "manifest.json", json.dumps(manifest, indent=1).encode())  # a full disk: rerun continues


def cut_shard(split, n):
    """Write the first n buffered tokens of split as its next shard, then the resume point (save_resume_point)."""
    tokens = held(split)
    buffers[split], buffered[split] = [tokens[n:]], buffered[split] - n
    path = out / f"{split}_{sum(sh['split'] == split for sh in manifest['shards']):06d}.bin"
    write_shard(path, tokens[:n], tok.vocab_size)
    manifest["shards"].append({"name": path.name, "split": split, "tokens": n, "sha256": sha256(path)})
    save_resume_point()


def cut_full_shards(split):
    """Cut split's buffer into shards while it holds a shard's worth (a long document may fill several) and
    --max_shards allows; returns whether --max_shards is reached."""
    global new_shards
    limit = max_shards or math.inf
    while new_shards < limit and buffered[split] >= shard_tokens:
        cut_shard(split, shard_tokens)
        new_shards += 1
    return new_shards >= limit


def held(split):
    """The tokens of split that no shard holds yet, as one array."""
    return np.concatenate([np.zeros(0, token_dtype(tok.vocab_size)), *buffers[split]])


def save_resume_point():
    """Record where a stopped run continues: the next row of the stream, the document counts so far, and the tokens
    that each split holds but no shard does yet, so that a resume reads again only the rows after the last shard.
    Validation's can be the work of many training shards (--val_tokens is a tenth of --shard_tokens by default):
    re-reading the stream from its first one would be starting again. They go to a file named for the shards before
    it; the previous one is removed once the manifest points past it, so a stop between the writes loses nothing."""
    pending = {s: held(s) for s in ("train", "val")}
    name = f"pending_{len(manifest['shards']):06d}.tokens"
    write_shard(out / name, np.concatenate([pending["train"], pending["val"]]), tok.vocab_size)
    filters.save()  # the near-duplicate decisions made so far, before the manifest that points past them
    before = manifest["resume"]["pending"]
    lengths = {s: len(t) for s, t in pending.items()}
    manifest["resume"] = {"row": counts["rows"], "counts": dict(counts), "pending": {"file": name, **lengths}}
    save_manifest()
    if before:
        (out / before["file"]).unlink(missing_ok=True)


def read_pending(pending):
    """The buffers a stopped run left (save_resume_point): each split's tokens that no shard holds yet."""
    if pending is None:
        return {"train": [], "val": []}
    tokens = np.array(open_shard(out / pending["file"], tok.vocab_size))
    return {"train": [tokens[: pending["train"]]], "val": [tokens[pending["train"] :]]}


def build_chat_data():
    """--mode=sft or dpo: conversations or preference pairs rendered with the chat template (chat.py), as
    (tokenizer, {split: {tokens, mask or lengths}}, counts, summary, source). Nothing is written yet, so a bad
    record loses nothing."""
    if tokenizer in ("", "gpt2"):  # tiktoken's gpt2 has no chat tokens
        raise UserError(f"--mode={mode} needs the base model's tokenizer: --tokenizer=out/RUN/tokenizer.model")
    tok = load_tokenizer(tokenizer)
    if not set(chat.ROLES.values()) | {chat.END} <= set(tok.special):
        raise UserError(
            f"{tokenizer} has no chat tokens (<|user|>, <|assistant|>, ...); {mode.upper()} needs a SentencePiece "
            f"tokenizer made by prepare.py"
        )
    try:
        if input or dataset:
            rows, source = open_stream()[:2]
            conversations = chat.row_conversations(rows, messages_field, lang) if mode == "sft" else None
        else:
            rows, conversations, source = local_conversations()
        if mode == "sft":
            data, counts, note = chat.render_sft(tok, conversations, block_size, split_of)
        else:
            pairs = rows if conversations is None else chat.preference_pairs(conversations, split_of)
            if sample_from and conversations is not None:
                import generation  # the model and the sandbox: only this option needs them

                pairs, how = generation.sampled_code_pairs(
                    sample_from, conversations, pairs, batch_size=sample_batch, samples=sample_n,
                    unjudged=sample_unjudged, own_only=sample_own_only, per_request=sample_pairs, others=sample_others,
                )  # fmt: skip
                source += f" | coding pairs: {how}"
            data, counts, note = chat.render_dpo(tok, pairs, block_size, split_of)
    except chat.ConversationError as e:
        raise UserError(str(e)) from None
    if not data["train"]["tokens"] or not data["val"]["tokens"]:
        if sample_others == "none":  # the run's own pairs alone: too few of its answers passed, or none failed
            raise UserError(
                f"{len(data['train']['lengths']) // 3} train and {len(data['val']['lengths']) // 3} held-out pairs "
                f"of {sample_from}'s own answers, passing against failing; need some in both: raise --sample_n, or "
                f"keep the written pairs beside them (--sample_others=written)"
            )
        raise UserError(f"{counts['kept']} usable records ({counts}); need some for both train and val")
    return tok, data, counts, note, source


def local_conversations():
    """(rows, conversations, source) of --mode=sft/dpo on the local corpus: --task's docstring questions (parsed
    from every file for --corpus=python; the demo set, from imported standard-library modules, for stdlib), then
    its coding requests. Each file is parsed once for both, on --num_threads processes, and the result kept for the
    other stage (chat.parse_corpus_cached)."""
    if task not in ("docstring", "code", "both"):
        raise UserError(f"--task={task}: expected docstring, code or both")
    if code_scope not in ("self_contained", "all"):
        raise UserError(f"--code_scope={code_scope}: expected self_contained or all")
    rows, files = open_stream()[:2]
    demo = task != "code" and corpus == "stdlib"  # the demo's questions come from imported modules, not parsed ones
    parse = ("code" if task == "both" else None) if demo else task
    found = chat.parse_corpus_cached(rows, parse, code_scope, num_threads) if parse else {}
    conversations, parts = [], []
    if demo:
        conversations = chat.stdlib_conversations()
        parts.append(f"{len(conversations):,} standard-library docstring questions (demo)")
    elif task != "code":
        conversations, parsed = found["docstring"]
        parts.append(
            f"docstring Q&A parsed with ast, never imported: {len(conversations):,} questions from "
            f"{parsed['files']:,} files ({parsed['not_modules']:,} test or not modules and {parsed['unparsed']:,} "
            f"that do not parse skipped; {parsed['too_long']:,} answers over {chat.MAX_ANSWER} characters and "
            f"{parsed['same_answer']:,} repeated ones dropped)"
        )
    if task != "docstring":
        code, c = found["code"]
        conversations += code
        parts.append(
            f"coding task ({code_scope}): {len(code):,} functions of {c['functions']:,} documented ones "
            f"({c['not_self_contained']:,} not self-contained, {c['stubs']:,} stubs, {c['too_long']:,} over "
            f"{chat.MAX_CODE} characters, {c['same_code']:,} copies left out)"
        )
    return rows, conversations, " + ".join(parts) + f" | {files}"


def write_chat_data(tok, data, counts, note, source):
    """SFT's tokens and loss masks, or DPO's tokens and pair lengths, per split (shards.write_split)."""
    shards = [
        entry
        for split_, parts in data.items()
        for entry in write_split(out, split_, tok.vocab_size, shard_tokens, **parts)
    ]
    disk.write_atomic(out / tok.file_name, tok.serialize(), "run the same command with --overwrite=true")
    global manifest
    manifest = {
        "settings": settings,
        "source": source,
        "mode": mode,
        "docs": counts,
        "shards": shards,
        "complete": True,
        "tokenizer": {"file": tok.file_name, "vocab_size": tok.vocab_size, "sha256": sha256(out / tok.file_name)},
    }
    save_manifest()
    print(f"{mode}: {note} | from {source} -> {out}/")


# ----------------------------------------------------------------------------- plan
t0 = time.time()
source_path = Path(input or dataset or corpus)
source_name = source_path.parent.name if "*" in input else source_path.stem
if mode not in ("pretrain", "sft", "dpo"):
    raise UserError(f"--mode={mode}: expected pretrain, sft or dpo")
if corpus not in pysource.CORPORA:
    raise UserError(f"--corpus={corpus}: expected {' or '.join(pysource.CORPORA)}")
if (input or dataset) and (corpus != "stdlib" or any(a.startswith("--corpus=") for a in sys.argv[1:])):
    raise UserError("--corpus picks the local source used when there is no --input/--dataset; give one or the other")
data_dir = data_dir or f"data/{'' if mode == 'pretrain' else mode + '_'}{source_name}"
out = Path(data_dir)
settings = {k: config[k] for k in SETTINGS}
if mode == "pretrain" and near_dup:  # recorded, so that a folder made with a training-only index is recognised
    settings["near_dup_index"] = "validation first"
plan = get_plan() if model_config else None
if plan:
    print(
        f"plan: {plan['parameters'] / 1e6:.1f}M parameters x {tokens_per_param:g} tokens/parameter = "
        f"{plan['target_tokens'] / 1e9:.2f}B tokens = {plan['shards']} shards of {shard_tokens / 1e6:g}M, "
        f"{plan['disk_gb']:.1f} GB on disk"
    )
target = max_tokens or (plan["target_tokens"] if plan else 0)
if plan_only:
    sys.exit(0)

# ----------------------------------------------------------------------------- resume or start
try:
    manifest = json.loads((out / "manifest.json").read_text()) if (out / "manifest.json").is_file() else None
except json.JSONDecodeError as e:  # edited by hand, or cut short: what it records cannot be trusted
    raise UserError(f"{out}/manifest.json is not JSON ({e.msg}); --overwrite=true rebuilds the folder") from None
point = manifest.get("resume", {}) if manifest and not overwrite else {}  # where a stopped run continues
pending_file = (point.get("pending") or {}).get("file")  # the tokens at that point that no shard holds yet
if manifest and not overwrite:
    was = manifest["settings"]
    keys = SETTINGS + [k for k in FILTER_KEYS if k in was and k not in SETTINGS]  # a filtered folder, filters off
    changed = [k for k in keys if was.get(k) != settings.get(k)]
    if changed:
        k = changed[0]
        if k in FILTER_KEYS and (k not in was or k not in settings):  # one of the two filters nothing
            made, keys = ("without", ("off", 0)) if k not in was else ("with", (was["quality"], was["near_dup"]))
            raise UserError(
                f"{out} holds shards made {made} filters, unlike these settings; --quality={keys[0]} "
                f"--near_dup={keys[1]} continues it as it was, or --overwrite=true / another --data_dir"
            )
        raise UserError(
            f"{out} holds shards made with {k}={was.get(k)!r}, not {settings[k]!r}; "
            f"rerun with the same settings to continue it, or --overwrite=true / another --data_dir"
        )
    if settings.get("near_dup_index") != was.get("near_dup_index"):  # the same keys: a folder made before 2026-12-03
        raise UserError(
            f"{out} was made with a near-duplicate index of training documents only, so near-copies of validation "
            f"files may be in its training split; --overwrite=true re-makes it with validation indexed first"
        )
    if find_tokenizer(out) is None or sha256(find_tokenizer(out)) != manifest["tokenizer"]["sha256"]:
        raise UserError(f"the tokenizer in {out} is not the one its shards were made with; use --overwrite=true")
    if not manifest["complete"] and "row" not in point:  # the old format: a resume point per split
        raise UserError(
            f"{out} was stopped by a prepare.py older than 2026-12-03, whose resume point this one does not read; "
            f"--overwrite=true re-makes it (or finish it with the prepare.py that started it)"
        )
    for name in [pending_file, "near_dup_val.keys" if near_dup and point.get("row") else None]:  # row 0: made again
        if name and not (out / name).is_file():
            raise UserError(f"{out / name} is missing: the resume point needs it; --overwrite=true re-makes the folder")
elif (any(out.glob("*.bin")) or find_tokenizer(out)) and not overwrite:
    raise UserError(f"{out} holds shards or a tokenizer that prepare.py did not record; --overwrite=true replaces them")
if manifest and manifest["complete"] and not overwrite:
    for shard in manifest["shards"]:
        if read_header(out / shard["name"])["n_tokens"] != shard["tokens"]:
            raise UserError(f"{out / shard['name']} does not match manifest.json; rebuild with --overwrite=true")
    print(f"{out} is already prepared with these settings; nothing to do (--overwrite=true rebuilds it)")
    sys.exit(0)
chat_data = build_chat_data() if mode != "pretrain" else None
if not chat_data:  # the documents' fields and a reused tokenizer checked before anything is written
    rows, source, field = open_stream()
    check_fields(rows, field)
    if tokenizer and tokenizer != "gpt2" and find_tokenizer(out) is None:
        load_tokenizer(tokenizer)
out.mkdir(parents=True, exist_ok=True)
stale = [*out.glob("*.tmp"), *(p for p in out.glob("pending_*.tokens") if p.name != pending_file)] + (
    [*out.glob("*.bin"), *out.glob("*.mask"), *out.glob("*.pairs"), out / "manifest.json"]
    + [out / "near_dup.keys", out / "near_dup_val.keys", *map(out.joinpath, TOKENIZER_FILES)]
    if overwrite or not manifest
    else []
)
for path in stale:  # temporary files of an interrupted run, or everything with --overwrite=true
    path.unlink(missing_ok=True)
if overwrite:
    manifest = None
if chat_data:
    write_chat_data(*chat_data)
    sys.exit(0)

tok = get_tokenizer(out, rows, field)
if find_tokenizer(out) is None:
    disk.write_atomic(out / tok.file_name, tok.serialize())
if manifest is None:
    zero = {"rows": 0, "kept": 0, "empty": 0, "filtered": 0, "val_assigned": 0, "train_assigned": 0}
    manifest = {
        "settings": settings,
        "source": source,
        "plan": plan,
        "docs": zero,
        "shards": [],
        "complete": False,
        "tokenizer": {"file": tok.file_name, "vocab_size": tok.vocab_size, "sha256": sha256(out / tok.file_name)},
        "resume": {"row": 0, "counts": zero, "pending": None},
    }
    save_manifest()
print(
    f"source: {source} | tokenizer {tok.file_name} ({tok.vocab_size} tokens) | target "
    f"{f'{target:,} train tokens' if target else 'the whole stream'} | {out}/"
)

# ----------------------------------------------------------------------------- stream -> shards
resume = manifest["resume"]
counts = dict(resume["counts"])
buffers = read_pending(resume["pending"])  # each split's tokens that no shard holds yet
buffered = {s: sum(map(len, b)) for s, b in buffers.items()}  # their number, kept: a sum per row would be quadratic
filters = Filters(rules, near_dup, dedup_ngram, out)
judges = Judges(tok, rules, near_dup, dedup_ngram, n_workers)  # before tqdm's monitor thread: a fork copies one thread
atexit.register(judges.stop)  # runs before multiprocessing's own exit handler (registered before it)
if filters.near and not resume["row"]:  # validation first: its near-copies leave training wherever they stand
    t_val = time.time()
    filters.index_validation(validation_documents(rows, field), counts)  # saved: a resume reads the keys back
    print(
        f"near_dup: {counts['near_dup_val_docs']:,} validation documents ({counts['near_dup_val_tokens']:,} tokens) "
        f"indexed first in {time.time() - t_val:.1f}s"
    )
rows = rows.skip(resume["row"]) if hasattr(rows, "skip") else rows[resume["row"] :]
total = len(rows) + resume["row"] if hasattr(rows, "__len__") else None  # a local corpus's size; a stream's unknown
bar = tqdm(total=total, initial=resume["row"], unit="doc", disable=None)  # on a terminal; the lines below go to logs
batches = judges.batches(documents(rows, field, first_row=resume["row"]), batch_docs)
filters.restore(resume["row"])  # the near-duplicate index as it stood at the resume point
new_shards, new_tokens, t_print, t_stream = 0, 0, time.time(), time.time()
stopped = cut_full_shards("train") or cut_full_shards("val")  # a stop by --max_shards may leave more than a shard
reached = bool(target) and counts["train_assigned"] >= target  # the token target assigned
while not (stopped or reached) and (batch := next(batches, None)):
    batch, verdicts = batch
    for row, name, text in batch:
        counts["rows"] += 1
        if text is None:
            counts["empty" if not score_field else "filtered"] += 1
            continue
        verdict = next(verdicts)  # token ids, the first quality rule failed, MinHash signature
        ids = verdict[0]
        s = "val" if is_val(name) and counts["val_assigned"] < val_tokens else "train"
        if s == "train" and filters.left_out(row, text, verdict, counts):
            continue
        counts["kept"] += 1
        counts[f"{s}_assigned"] += len(ids)
        buffers[s].append(ids)
        buffered[s] += len(ids)
        new_tokens += len(ids)
        stopped = cut_full_shards(s)  # --max_shards written in this run
        reached = bool(target) and counts["train_assigned"] >= target
        if stopped or reached:
            break
    bar.update(len(batch))
    bar.set_postfix_str(f"{counts['train_assigned']:,} train tokens", refresh=False)
    if time.time() - t_print > 10 and bar.disable:
        t_print, rate = time.time(), new_tokens / (time.time() - t_stream)
        eta = f" | eta {runtime.format_duration((target - counts['train_assigned']) / rate)}" if target else ""
        print(
            f"{counts['rows']:,} documents read, {counts['kept']:,} kept | {counts['train_assigned']:,} train "
            f"tokens | {rate:,.0f} tok/s{eta}",
            flush=True,
        )

bar.close()
judges.stop()
if stopped:  # the manifest already records where to continue
    print(f"stopped after {new_shards} shards (--max_shards); run the same command to continue")
    sys.exit(0)
if counts["kept"] == 0:
    raise UserError(f"no document passed the filter ({score_field} >= {score_min}); lower --score_min")
for s in ("val", "train"):  # the stream or the target ended: the rest of each buffer is the last shard
    if buffered[s]:
        cut_shard(s, buffered[s])
filters.save()
manifest["docs"], manifest["complete"] = counts, True
last_point = manifest.pop("resume")  # a complete folder has nothing to continue
save_manifest()
if last_point["pending"]:
    (out / last_point["pending"]["file"]).unlink()
totals = {s: sum(sh["tokens"] for sh in manifest["shards"] if sh["split"] == s) for s in ("train", "val")}
dt = time.time() - t_stream
print(
    f"done: {counts['rows']:,} documents read, {counts['kept']:,} kept, {counts['empty']:,} empty, "
    f"{counts['filtered']:,} filtered | train {totals['train']:,} tokens, val {totals['val']:,} tokens in "
    f"{len(manifest['shards'])} shards | {new_tokens / dt:,.0f} tok/s over {dt:.1f}s"
)
if filtering:
    print(f"filters: {filters.describe(counts)}")
