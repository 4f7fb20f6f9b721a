"""Build a token dataset: documents -> SentencePiece BPE tokenizer -> memmap .bin shards.

    python prepare.py                                   # default corpus: this Python's standard library
    python prepare.py --input=notes/ --data_dir=data/notes --vocab_size=8192
    python prepare.py --input=corpus.jsonl --text_field=text --vocab_size=32000

The default corpus needs no download: every .py file of the running Python's standard library, one document
per file, in sorted path order. A file goes to validation when a hash of its path says so, so the split is
stable from run to run. --input takes .txt files (one document each) and .jsonl files (one document per
line, from --text_field), or folders of them.

Writes into data_dir: tokenizer.model, train_000000.bin, val_000000.bin (see shards.py) and meta.json.
"""

import json
import sys
import sysconfig
import time
import zlib
from pathlib import Path

import numpy as np

import runtime
from runtime import UserError
from shards import read_header, token_dtype, write_shard
from tokenizer import Tokenizer, train_tokenizer

# -----------------------------------------------------------------------------
input = ""  # file or folder of .txt/.jsonl documents; empty = the Python standard library
data_dir = ""  # output folder; empty = data/stdlib, or data/<input name> when --input is given
text_field = "text"  # field holding the document in .jsonl input
vocab_size = 4096  # tokenizer size: 4096 suits the CPU demo, 32000 the reference run
tokenizer = ""  # path of an existing tokenizer.model to reuse instead of training one
val_permille = 50  # documents per 1000 held out for validation (chosen by a hash of the document's name)
shard_tokens = 100_000_000  # tokens per .bin shard
overwrite = False  # replace the shards of an existing data_dir
# -----------------------------------------------------------------------------
runtime.install_error_handler()
config = runtime.configure(globals(), sys.argv[1:])


def read_text(path):
    with open(path, encoding="utf-8", newline="") as f:  # newline="": keep \r\n exactly as in the file
        return f.read()


def stdlib_documents():
    """(name, text) for every .py file of the standard library; files that are not UTF-8 are skipped."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs, skipped = [], 0
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if "site-packages" in rel.parts or "dist-packages" in rel.parts:
            continue
        try:
            docs.append((rel.as_posix(), read_text(path)))
        except (UnicodeDecodeError, OSError):
            skipped += 1  # a few test fixtures are deliberately in latin-1 or koi8-r
    return docs, skipped, f"python {sys.version.split()[0]} standard library ({root})"


def input_documents(path, field):
    """(name, text) from .txt files (one document each) and .jsonl files (one per line) under path."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"--input={path} does not exist")
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl"))
    if not files:
        raise UserError(f"no .txt or .jsonl files under {path}")
    docs, skipped = [], 0
    for f in files:
        if f.suffix == ".jsonl":
            for n, line in enumerate(f.read_text(encoding="utf-8").splitlines()):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{f}:{n + 1} is not valid JSON ({e.msg})") from None
                if field not in record:
                    raise UserError(f"{f}:{n + 1} has no field {field!r} (it has {sorted(record)}); set --text_field")
                docs.append((f"{f}:{n + 1}", str(record[field])))
        elif f.suffix == ".txt":
            try:
                docs.append((str(f), read_text(f)))
            except UnicodeDecodeError:
                skipped += 1
        else:
            raise UserError(f"--input={f}: expected a .txt or .jsonl file or a folder of them")
    return docs, skipped, str(path)


def is_val(name):
    return zlib.crc32(name.encode()) % 1000 < val_permille


def is_complete(folder, settings):
    """True if folder holds a finished prepare.py run with the same settings and every shard it lists."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
        shards = [folder / name for split in meta["splits"].values() for name in split["shards"]]
        return meta["settings"] == settings and all(read_header(p)["n_tokens"] > 0 for p in shards)
    except (OSError, ValueError, KeyError):
        return False


def write_split(split, token_lists, vocab):
    """Concatenate documents (each already led by the boundary token) into shards of shard_tokens."""
    flat = np.concatenate([np.asarray(t, dtype=token_dtype(vocab)) for t in token_lists])
    paths = []
    for i, start in enumerate(range(0, len(flat), shard_tokens)):
        path = Path(data_dir) / f"{split}_{i:06d}.bin"
        write_shard(path, flat[start : start + shard_tokens], vocab)
        paths.append(path.name)
    return len(flat), paths


# -----------------------------------------------------------------------------
t0 = time.time()
data_dir = data_dir or ("data/stdlib" if not input else f"data/{Path(input).stem}")
out = Path(data_dir)
settings = {k: v for k, v in config.items() if k not in ("data_dir", "overwrite")}
if any(out.glob("*.bin")) and not overwrite:
    if is_complete(out, settings):  # the same command again: nothing to do
        print(f"{out} is already prepared with these settings; nothing to do (--overwrite=true rebuilds it)")
        sys.exit(0)
    raise UserError(f"{out} already holds other shards; pass --overwrite=true to replace them or pick --data_dir")
docs, skipped, source = stdlib_documents() if not input else input_documents(input, text_field)
docs = [(name, text) for name, text in docs if text]
if len(docs) < 2:
    raise UserError(f"{source} has {len(docs)} non-empty documents; need at least 2 (train and validation)")
val = [d for d in docs if is_val(d[0])]
if not val:  # tiny inputs: hold out the one document with the smallest hash rather than none
    val = [min(docs, key=lambda d: zlib.crc32(d[0].encode()))]
val_names = {name for name, _ in val}
train = [d for d in docs if d[0] not in val_names]
print(f"documents: {len(train)} train, {len(val)} val, {skipped} skipped (not UTF-8) from {source}")

out.mkdir(parents=True, exist_ok=True)
for stale in [*out.glob("*.bin"), out / "meta.json"]:  # only reached with --overwrite=true
    stale.unlink(missing_ok=True)
if tokenizer:
    tok = Tokenizer(tokenizer)
    print(f"tokenizer: reusing {tokenizer} ({tok.vocab_size} tokens)")
else:
    lines = [line for _, text in train for line in text.split("\n") if line.strip()]
    try:
        tok = Tokenizer(model_proto=train_tokenizer(lines, vocab_size))
    except RuntimeError as e:  # SentencePiece refuses e.g. a vocabulary larger than the text supports
        raise UserError(f"tokenizer training failed: {str(e).splitlines()[-1]}; lower --vocab_size") from None
    print(f"tokenizer: trained a {tok.vocab_size}-token BPE in {time.time() - t0:.1f}s")
tmp = out / "tokenizer.model.tmp"
tmp.write_bytes(tok.sp.serialized_model_proto())
tmp.replace(out / "tokenizer.model")

meta = {"settings": settings, "source": source, "vocab_size": tok.vocab_size, "skipped_files": skipped, "splits": {}}
for split, split_docs in (("train", train), ("val", val)):
    texts = [text for _, text in split_docs]
    ids = tok.encode_batch(texts)
    bad = [name for (name, text), i in zip(split_docs, ids, strict=True) if tok.decode(i) != text]
    if bad:
        raise UserError(f"tokenizer does not round-trip {len(bad)} documents, e.g. {bad[0]}; please report it")
    n_tokens, paths = write_split(split, [[tok.bos_id] + i for i in ids], tok.vocab_size)
    chars = sum(len(t) for t in texts)
    meta["splits"][split] = {"documents": len(texts), "tokens": n_tokens, "characters": chars, "shards": paths}
    print(
        f"{split}: {len(texts)} documents, {n_tokens:,} tokens ({chars / n_tokens:.2f} chars/token), "
        f"round trip exact, {len(paths)} shard(s)"
    )
(out / "meta.json.tmp").write_text(json.dumps(meta, indent=2))
(out / "meta.json.tmp").replace(out / "meta.json")  # written last: its presence marks a finished folder
print(f"wrote {out}/ in {time.time() - t0:.1f}s")
