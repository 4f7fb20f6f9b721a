"""The local Python corpora (pysource.py) and the docstring Q&A built from them (chat.source_conversations), on a
fake standard library and site-packages made here; prepare.py --corpus=python on that tree through the one seam,
pysource.python_roots."""

import fcntl
import hashlib
import json
import shutil
import sys
import sysconfig
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import documents_in, run, stdlib_sample

import chat
import pysource
from shards import open_pairs, open_shard
from tokenizer import Tokenizer

MAX_BYTES = 100_000  # the fake tree's cap: big.py is over it
ESSAY = "A first paragraph far too long to be an answer. " * 15  # 720 characters: over chat.MAX_ANSWER

FILES = {  # (root, path) -> source; bytes are written as they are
    ("lib", "a/__init__.py"): "",
    ("lib", "b/__init__.py"): "",  # the same (empty) bytes as a/__init__.py: a duplicate
    ("lib", "big.py"): "x = 1\n" * 20_000,  # 120 KB: over MAX_BYTES
    ("lib", "latin.py"): b"# caf\xe9, written in latin-1\n",
    ("lib", "json/__init__.py"): '''"""JSON."""


def dumps(obj, indent=None):
    """Serialize ``obj`` to a JSON formatted ``str``,
    on two lines.

    More that is not the answer.
    """


def loads(s):
    """loads(s) -> object

    Deserialize ``s`` to a Python object: the prose after a signature line."""


def _private(x):
    """A private helper, documented at length all the same."""


def undocumented(x):
    return x


def short():
    """Too short."""
''',
    ("lib", "json/decoder.py"): '''class JSONDecoder:
    """The decoder."""

    def decode(self, s):
        """Return the Python representation of ``s``, a str instance."""

    def _scan(self, s):
        """A private method, documented at length all the same."""


class _Private:
    def shown(self):
        """A public method of a private class, skipped."""


async def fetch(url):
    """Fetch a JSON document from url, asynchronously."""
''',
    ("lib", "shared.py"): b'def shared():\r\n    """A file installed twice, with Windows line ends."""\r\n',
    ("lib", "test/test_json.py"): 'def check_dumps():\n    """A test of the standard library, not an answer."""\n',
    ("lib", "site-packages/inside.py"): "# a standard library's own site-packages folder is not the standard library\n",
    ("site", "pkg/__init__.py"): '''import pathlib

pathlib.Path(MARKER).write_text("pkg was imported")
raise RuntimeError("importing pkg runs its code")


def helper(x):
    """Return x untouched, from the package's top level."""


class Widget:
    """A widget."""

    def render(self):
        """Draw the widget on the screen:
            indented, as docstrings are.

        A second paragraph."""

    def _internal(self):
        """Internal, documented at length all the same."""

    def copy(self):
        """Return x untouched, from the package's top level."""

    def essay(self):
        """ESSAY"""
''',
    ("site", "pkg/shared_copy.py"): b'def shared():\r\n    """A file installed twice, with Windows line ends."""\r\n',
    ("site", "pkg/sub/mod.py"): 'def func():\n    """A function of a nested module, documented."""\n',
    ("site", "pkg/test_thing.py"): 'def check():\n    """A test module of a package, not an answer."""\n',
    ("site", "pkg/tests/helpers.py"): 'def helper():\n    """A helper under tests/, not an answer."""\n',
    ("site", "my-scripts/tool.py"): 'def main():\n    """A script that no dotted name imports."""\n',
    ("site", "py2.py"): 'print "Python 2"\n',
}
KEPT = [  # the corpus in name order: a duplicate keeps its first name, site-packages/... sorts before stdlib/...
    "site-packages/my-scripts/tool.py",
    "site-packages/pkg/__init__.py",
    "site-packages/pkg/shared_copy.py",
    "site-packages/pkg/sub/mod.py",
    "site-packages/pkg/test_thing.py",
    "site-packages/pkg/tests/helpers.py",
    "site-packages/py2.py",
    "stdlib/a/__init__.py",
    "stdlib/json/__init__.py",
    "stdlib/json/decoder.py",
    "stdlib/test/test_json.py",
]
QA = [
    ("pkg.helper", "Return x untouched, from the package's top level."),
    ("pkg.Widget.render", "Draw the widget on the screen:\n    indented, as docstrings are."),
    ("pkg.shared_copy.shared", "A file installed twice, with Windows line ends."),
    ("pkg.sub.mod.func", "A function of a nested module, documented."),
    ("json.dumps", "Serialize ``obj`` to a JSON formatted ``str``,\non two lines."),
    ("json.loads", "Deserialize ``s`` to a Python object: the prose after a signature line."),
    ("json.decoder.JSONDecoder.decode", "Return the Python representation of ``s``, a str instance."),
    ("json.decoder.fetch", "Fetch a JSON document from url, asynchronously."),
]


@pytest.fixture
def tree(tmp_path):
    """(roots, marker): a fake standard library and site-packages; marker is the file pkg writes when imported."""
    marker = tmp_path / "imported"
    for (root, rel), source in FILES.items():
        path = tmp_path / root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(source, str):
            source = source.replace("MARKER", repr(str(marker))).replace("ESSAY", ESSAY).encode()
        path.write_bytes(source)
    (tmp_path / "site" / "gone.py").symlink_to(tmp_path / "uninstalled.py")  # dangling: unreadable
    return [("stdlib", str(tmp_path / "lib")), ("site-packages", str(tmp_path / "site"))], marker


def test_python_files_dedupe_skip_and_count(tree):
    roots, _ = tree
    files, counts = pysource.python_files(roots, max_bytes=MAX_BYTES)
    assert [name for name, _ in files] == KEPT
    assert counts == {
        "stdlib": 4,
        "site-packages": 7,
        "duplicate": 2,
        "too_large": 1,
        "not_utf8": 1,
        "unreadable": 1,
    }
    assert "4 stdlib + 7 site-packages .py files; skipped 2 duplicates, 1 over 100,000 bytes" in pysource.describe(
        counts, MAX_BYTES
    )
    rows = pysource.FileRows(files)
    texts = {row["name"]: row["text"] for row in rows}
    assert texts["site-packages/pkg/shared_copy.py"].count("\r\n") == 2  # read as it is, line ends kept
    assert list(rows) == list(rows) and [r["name"] for r in rows[3:]] == KEPT[3:]  # re-iterable, resumable


def test_docstring_qa_from_source_without_importing(tree):
    roots, marker = tree
    files, _ = pysource.python_files(roots, max_bytes=MAX_BYTES)
    conversations, counts = chat.source_conversations(pysource.FileRows(files))
    assert not marker.exists() and "pkg" not in sys.modules  # pkg/__init__.py would write it, then raise
    got = [(c[0]["content"].split("`")[1], c[1]["content"]) for c in conversations]
    assert got == QA
    for (question, _), (name, _) in zip(conversations, QA, strict=True):
        assert question["content"] in [q.format(name=name) for q in chat.QUESTIONS]
    # tests/, test_*.py, test/ and my-scripts/ are not modules to ask about; py2.py does not parse; Widget.copy
    # repeats helper's answer and Widget.essay's is over MAX_ANSWER
    assert counts == {"files": 11, "not_modules": 4, "unparsed": 1, "too_long": 1, "same_answer": 1}
    split = ["val" if i in (1, 3) else "train" for i in range(len(conversations))]
    pairs = chat.preference_pairs(conversations, split.__getitem__)
    assert [(p["prompt"], p["chosen"]) for p in pairs] == [(c[0]["content"], c[1]["content"]) for c in conversations]
    answers = [a for _, a in QA]
    for i, p in enumerate(pairs):  # rejected: another function's answer, from the pair's own split
        assert p["rejected"] != p["chosen"] and split[answers.index(p["rejected"])] == split[i]


def prepare(roots, *args, check=True):
    """prepare.py run as a user runs it, but with python_roots() answering the fake tree's roots and the parse cache
    in the tree's folder (chat.cache_dir), not ~/.cache."""
    cache = Path(roots[0][1]).parent / "cache"
    code = (
        f"import pathlib, runpy, chat, pysource; pysource.python_roots = lambda: {roots!r}; "
        f"chat.cache_dir = lambda: pathlib.Path({str(cache)!r}); runpy.run_path('prepare.py', run_name='__main__')"
    )
    return run("prepare.py", *args, cmd=[sys.executable, "-c", code], check=check)


def test_prepare_corpus_python_on_a_fake_tree(tree, tiny_data, tmp_path):
    roots, marker = tree
    tokenizer = f"--tokenizer={tiny_data / 'tokenizer.model'}"
    out = tmp_path / "python"
    args = [tokenizer, f"--max_file_bytes={MAX_BYTES}", "--val_permille=200"]
    proc = prepare(roots, "--corpus=python", f"--data_dir={out}", *args)
    assert "standard library and site-packages: 4 stdlib + 7 site-packages .py files; skipped 2 duplicates" in (
        proc.stdout
    )
    docs, manifest = documents_in(out)
    texts = {row["name"]: row["text"] for row in pysource.FileRows(pysource.python_files(roots, MAX_BYTES)[0])}
    assert sorted(docs["train"] + docs["val"]) == sorted(t for t in texts.values() if t)
    assert sorted(docs["val"]) == sorted(t for n, t in texts.items() if zlib.crc32(n.encode()) % 1000 < 200)
    assert (manifest["docs"]["rows"], manifest["docs"]["empty"]) == (11, 1)  # a/__init__.py is empty
    assert manifest["settings"]["corpus"] == "python" and "2 duplicates" in manifest["source"]
    # the local corpus is filtered by default (auto): the code rules and near-duplicates at 0.7, as measured
    assert (manifest["settings"]["quality"], manifest["settings"]["near_dup"]) == ("code", 0.7)
    assert "filters: 0 training documents left out" in proc.stdout
    # the validation files, read alone before the pass, are the ones the pass sends to validation
    counts = manifest["docs"]
    assert (counts["near_dup_val_docs"], counts["near_dup_val_tokens"]) == (len(docs["val"]), counts["val_assigned"])
    # a folder made without them (as every folder before 2026-12-02) is not continued with them on: one error line
    plain = tmp_path / "plain"
    prepare(roots, "--corpus=python", f"--data_dir={plain}", *args, "--quality=off", "--near_dup=0")
    proc = prepare(roots, "--corpus=python", f"--data_dir={plain}", *args, check=False)
    assert proc.returncode == 2 and proc.stderr.count("error:") == 1 and "Traceback" not in proc.stderr
    assert "made without filters" in proc.stderr and "--quality=off --near_dup=0 continues it" in proc.stderr
    # and the other way: a filtered folder is not taken as done by a run without filters
    proc = prepare(roots, "--corpus=python", f"--data_dir={out}", *args, "--quality=off", "--near_dup=0", check=False)
    assert proc.returncode == 2 and "made with filters" in proc.stderr, proc.stdout + proc.stderr
    assert "--quality=code --near_dup=0.7 continues it" in proc.stderr

    # SFT and DPO from the same files: the same questions in the same order, so the same held-out split
    val = [i for i in range(len(QA)) if zlib.crc32(str(i).encode()) % 1000 < 500]
    tok = Tokenizer(str(tiny_data / "tokenizer.model"))
    common = ["--corpus=python", tokenizer, "--val_permille=500", f"--max_file_bytes={MAX_BYTES}"]
    prepare(roots, "--mode=sft", f"--data_dir={tmp_path / 'sft'}", *common)
    ids, mask = open_shard(tmp_path / "sft" / "val_000000.bin"), open_shard(tmp_path / "sft" / "val_000000.mask", 2)
    assert tok.decode(ids[mask == 1].tolist()) == "".join(QA[i][1] for i in val)  # <|end|> decodes to nothing
    proc = prepare(roots, "--mode=dpo", f"--data_dir={tmp_path / 'dpo'}", *common)
    assert "8 pairs kept of 8" in proc.stdout and "never imported: 8 questions" in proc.stdout
    assert "parse: 11 files as an earlier run parsed them" in proc.stdout  # SFT's parse, not a second one
    tokens, lengths = open_pairs(tmp_path / "dpo", "val", tok.vocab_size)
    starts = np.cumsum([0, *lengths.sum(1).tolist()])
    chosen = [tokens[a + p : a + p + c].tolist() for a, (p, c, _) in zip(starts[:-1], lengths.tolist(), strict=True)]
    assert [tok.decode(c) for c in chosen] == [QA[i][1] for i in val]
    assert json.loads((tmp_path / "dpo" / "manifest.json").read_text())["source"].startswith("docstring Q&A")
    assert not marker.exists()


def test_corpus_errors(tmp_path):
    for args, fragment in [
        (["--corpus=pypi"], "corpus=pypi: expected stdlib or python"),
        (["--corpus=python", f"--input={tmp_path}"], "--corpus picks the local source"),
        (["--corpus=stdlib", "--dataset=allenai/c4"], "--corpus picks the local source"),
    ]:
        proc = run("prepare.py", *args, f"--data_dir={tmp_path / 'x'}", check=False)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
        assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {fragment}")
    assert not (tmp_path / "x").exists()


def test_stdlib_corpus_is_the_one_it_was():
    """--corpus=stdlib (the default) reads the files prepare.py always read, in the same order: every .py file of
    the standard library outside its site-packages, sorted as paths, text None for those not in UTF-8."""
    root = Path(sysconfig.get_paths()["stdlib"])
    expected = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if not {"site-packages", "dist-packages"} & set(rel.parts):
            try:
                expected.append((rel.as_posix(), path.read_bytes().decode("utf-8")))
            except UnicodeDecodeError:
                expected.append((rel.as_posix(), None))
    assert [(r["name"], r["text"]) for r in pysource.stdlib_rows()] == expected
    assert any(text is None for _, text in expected)  # the latin-1 and koi8-r test fixtures


def synthetic_rows(n=40):
    """Rows of Python files whose module names, answers and functions repeat across files (by i % 2, 3, 4, 5, 6, 9),
    with stubs, functions over chat.MAX_CODE, answers over chat.MAX_ANSWER, methods, third-party code, a test module,
    a file that does not parse and one that is not UTF-8: every rule of parse_corpus, in a fixed text."""
    rows = []
    for i in range(n):
        answer = "Scale the shape by k, in place." if i % 2 else "x" * (chat.MAX_ANSWER + 1)
        text = f'''import math
import numpy as np


def area{i % 5}(r):
    """Return the area of a circle of radius r, computed with pi{"" if i % 3 else " (again)"}."""
    return math.pi * r * r


def mean{i}(values):
    """Return the arithmetic mean of values as a NumPy float number."""
    return np.mean(values)


def stub{i % 2}(x):
    """Not written yet: the body only raises, so nothing to learn."""
    raise NotImplementedError


def wide{i % 4}(x):
    """Return a long list of numbers: with 500 of them, too long to ask."""
    return [{", ".join(str(k) for k in range(500 if i % 4 == 0 else 20))}]


class Shape{i % 3}:
    def scale(self, k):
        """{answer}"""
        self.k = k * {i % 6}
'''
        rows.append({"name": f"site-packages/pkg{i % 6}/mod{i % 9}.py", "text": text})
    rows[5]["name"] = "site-packages/pkg/tests/test_x.py"  # not asked
    rows[7]["text"] = 'print "Python 2"\n'  # does not parse
    rows[11]["text"] = None  # not UTF-8
    return rows


# sha256 of json.dumps of {"docstring": source_conversations(rows), "code": code_conversations(rows, scope)} of
# synthetic_rows() by the code before each file was parsed once (c67c501): the same output, whatever the workers
BEFORE = {
    "self_contained": "80481d5ab24d88cd65b61dab66db43ab7b255a4270072b7810ac631594f8b78c",
    "all": "4168b379eb5b75853128eb6ceb589ea4b62529c5bcc55444a1f17eb511d1d03a",
}


def test_one_parse_per_file_on_any_number_of_workers():
    rows = synthetic_rows()
    for scope, digest in BEFORE.items():
        serial = chat.parse_corpus(rows, "both", scope, workers=1)
        assert hashlib.sha256(json.dumps(serial).encode()).hexdigest() == digest
        assert chat.parse_corpus(rows, "both", scope, workers=2) == serial  # ordered: 40 files in chunks of 5
    # on real files too, each of them twice (the second copy's names, answers and code all asked before)
    rows = [{"name": f"{root}/{name}", "text": text} for root in ("stdlib", "site") for name, text in stdlib_sample(30)]
    serial = chat.parse_corpus(rows, "both", "all", workers=1)
    assert serial == chat.parse_corpus(rows, "both", "all", workers=2)
    assert len(serial["docstring"][0]) > 100 and len(serial["code"][0]) > 20 and serial["code"][1]["same_code"] > 20


def test_sft_data_the_same_on_one_or_two_workers_and_dpo_reuses_the_parse(tree, tiny_data, tmp_path):
    roots, _ = tree
    common = ["--corpus=python", "--task=both", f"--tokenizer={tiny_data / 'tokenizer.model'}", "--val_permille=500"]
    common += [f"--max_file_bytes={MAX_BYTES}"]
    folders = {}
    for workers in (1, 2):
        shutil.rmtree(tmp_path / "cache", ignore_errors=True)  # each parses
        folders[workers] = tmp_path / f"sft{workers}"
        proc = prepare(roots, "--mode=sft", f"--num_threads={workers}", f"--data_dir={folders[workers]}", *common)
        assert f"parse: 11 files parsed with ast on {workers} process(es)" in proc.stdout
    files = sorted(p.name for p in folders[1].iterdir())
    assert files == sorted(p.name for p in folders[2].iterdir()) and "manifest.json" in files
    for name in files:
        assert (folders[1] / name).read_bytes() == (folders[2] / name).read_bytes(), name
    proc = prepare(roots, "--mode=dpo", f"--data_dir={tmp_path / 'dpo'}", *common)
    assert "parse: 11 files as an earlier run parsed them" in proc.stdout and "8 questions" in proc.stdout
    # a file that changed is a new corpus: parsed again, its new function asked
    with open(Path(roots[1][1]) / "pkg" / "sub" / "mod.py", "a") as f:
        f.write('\n\ndef added():\n    """A function added since the last parse, documented."""\n')
    proc = prepare(roots, "--mode=dpo", f"--data_dir={tmp_path / 'dpo2'}", *common)
    assert "parse: 11 files parsed with ast" in proc.stdout and "9 questions" in proc.stdout


def test_parse_cache_reused_remade_and_waited_for(tmp_path, monkeypatch):
    monkeypatch.setattr(chat, "cache_dir", lambda: tmp_path)
    rows, said = synthetic_rows(), []
    parsed = json.loads(json.dumps(chat.parse_corpus_cached(rows, "both", "all", 1, said.append)))
    assert "40 files parsed with ast on 1 process(es)" in said[-1]
    assert chat.parse_corpus_cached(rows, "both", "all", 1, said.append) == parsed
    assert "as an earlier run parsed them" in said[-1]
    cache = tmp_path / "parse_both_all.json"
    cache.write_bytes(cache.read_bytes()[:1000])  # cut short: parsed again, written whole
    again = chat.parse_corpus_cached(rows, "both", "all", 1, said.append)
    assert json.loads(json.dumps(again)) == parsed and "parsed with ast" in said[-1]
    assert json.loads(cache.read_text())["parts"] == parsed
    # another run parsing with these settings holds the lock: this one waits, then takes what that one kept
    cache.unlink()
    with open(tmp_path / "parse_both_all.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        waiting = threading.Thread(target=chat.parse_corpus_cached, args=(rows, "both", "all", 1, said.append))
        waiting.start()
        deadline = time.time() + 30
        while "waiting for another run" not in said[-1] and time.time() < deadline:
            time.sleep(0.01)
        cache.write_text(json.dumps({"key": chat.corpus_key(rows, "both", "all"), "parts": parsed}))
    waiting.join(timeout=30)
    assert "as an earlier run parsed them" in said[-1]
