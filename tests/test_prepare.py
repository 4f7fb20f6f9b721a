"""prepare.py on corpora in the seed's schemas, through the same datasets streaming path a hub name takes."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO, TINY, documents_in, run, stdlib_sample

from shards import open_shard


@pytest.fixture(scope="module")
def fineweb(tmp_path_factory):
    """A local parquet file in Ultra-FineWeb's schema: `content` and a numeric `score` (some empty texts)."""
    root = tmp_path_factory.mktemp("fineweb")
    texts = [text for _, text in stdlib_sample(60)] * 2
    rows = {"content": [t if i % 17 else "" for i, t in enumerate(texts)], "score": [(i % 10) / 10 for i in range(120)]}
    pq.write_table(pa.table(rows), root / "part-000.parquet")
    with open(root / "part-000.jsonl", "w") as f:
        for content, score in zip(rows["content"], rows["score"], strict=True):
            f.write(json.dumps({"content": content, "score": score}) + "\n")
    return root, rows


# shards of 20,000 tokens: ~80 of them. At 2,000 (820 shards) each run spent most of its time rewriting the manifest,
# which lists every shard, after each one.
ARGS = ["--text_field=content", "--vocab_size=512", "--val_permille=150", "--shard_tokens=20000"]


def prepare(src, out, *extra, check=True, **kw):
    return run("prepare.py", f"--input={src}", f"--data_dir={out}", *ARGS, *extra, check=check, **kw)


@pytest.fixture(scope="module")
def whole(fineweb, tmp_path_factory):
    """The parquet file prepared in one run, at ARGS: read by the tests below, never written to."""
    out = tmp_path_factory.mktemp("whole") / "data"
    prepare(fineweb[0] / "part-000.parquet", out)
    return out


def test_filtered_stream_keeps_exactly_the_passing_documents(fineweb, tmp_path):
    root, rows = fineweb
    expected = [c for c, s in zip(rows["content"], rows["score"], strict=True) if c and s >= 0.8]
    for src in ("part-000.parquet", "part-000.jsonl"):
        out = tmp_path / src
        prepare(root / src, out, "--score_field=score", "--score_min=0.8")
        docs, manifest = documents_in(out)
        assert sorted(docs["train"] + docs["val"]) == sorted(expected)
        assert docs["val"] and docs["train"]
        counts = manifest["docs"]
        assert (counts["rows"], counts["kept"]) == (120, len(expected))
        assert counts["filtered"] == 120 - len(expected)  # empty texts and low scores
        assert manifest["complete"] and manifest["settings"]["score_min"] == 0.8


def test_manifest_adds_up(whole):
    out = whole
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["shards"]) > 20
    for shard in manifest["shards"]:
        assert len(open_shard(out / shard["name"])) == shard["tokens"]
        assert shard["tokens"] == 20000 or shard is [s for s in manifest["shards"] if s["split"] == shard["split"]][-1]
    import hashlib

    assert all(hashlib.sha256((out / s["name"]).read_bytes()).hexdigest() == s["sha256"] for s in manifest["shards"])


def test_resume_after_interruption_gives_the_same_shards(fineweb, whole, tmp_path):
    root, _ = fineweb
    src = root / "part-000.parquet"
    stopped, killed = tmp_path / "stopped", tmp_path / "killed"
    # a clean stop: --max_shards=5, twice, then the same command to the end
    for _ in range(2):
        assert "run the same command to continue" in prepare(src, stopped, "--max_shards=5").stdout
    # a folder stopped by a prepare.py older than 2026-12-03 (a resume point per split), or without the file of its
    # resume point's unwritten tokens: one error line, and the folder left as it was
    old = tmp_path / "old"
    shutil.copytree(stopped, old)
    manifest = json.loads((old / "manifest.json").read_text())
    (old / manifest["resume"]["pending"]["file"]).unlink()
    one_line_error(prepare(src, old, check=False), manifest["resume"]["pending"]["file"], "is missing")
    manifest["resume"] = {s: {"row": 0, "offset": 0, "counts": manifest["resume"]["counts"]} for s in ("train", "val")}
    (old / "manifest.json").write_text(json.dumps(manifest))
    before = {p.name: p.read_bytes() for p in old.iterdir()}
    one_line_error(prepare(src, old, check=False), "older than 2026-12-03", "--overwrite=true")
    assert {p.name: p.read_bytes() for p in old.iterdir()} == before
    prepare(src, stopped)
    # a hard kill at an arbitrary moment: as soon as the first training shard exists
    cmd = [sys.executable, str(REPO / "prepare.py"), f"--input={src}", f"--data_dir={killed}", *ARGS, "--batch_docs=1"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / "train_000001.bin").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not json.loads((killed / "manifest.json").read_text())["complete"]
    prepare(src, killed)
    reference = json.loads((whole / "manifest.json").read_text())
    for out in (stopped, killed):
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["shards"] == reference["shards"] and manifest["docs"] == reference["docs"]
        assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in whole.iterdir())


def test_train_reads_a_multi_shard_folder(whole, tmp_path):
    assert len(list(whole.glob("train_*.bin"))) > 5
    out = tmp_path / "run"
    run(
        "train.py",
        f"--data_dir={whole}",
        f"--out_dir={out}",
        *TINY,
        "--max_iters=30",
        "--eval_interval=30",
        "--learning_rate=0.02",
    )
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val = {r["step"]: r["val_loss"] for r in records if "val_loss" in r}
    assert val[30] < val[0] - 0.5


def test_plan_for_the_reference_config():
    out = run("prepare.py", "--model_config=config/pretrain_137m.py", "--plan_only=true", "--vocab_size=32000").stdout
    # 137,841,408 parameters x 20 = 2.757B tokens; 28 shards of 100M; 2 bytes a token
    assert "137.8M parameters" in out and "2.76B tokens" in out and "28 shards" in out and "5.5 GB" in out


def one_line_error(proc, *fragments):
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and all(f in line for f in fragments), line


def test_bad_input(fineweb, tmp_path):
    root, _ = fineweb
    src = root / "part-000.parquet"
    one_line_error(prepare(src, tmp_path / "a", "--text_field=text", check=False), "no field 'text'", "content")
    one_line_error(prepare(src, tmp_path / "b", "--score_field=quality", check=False), "'quality'", "score")
    # a vocabulary too small for the text's characters: the advice is to raise it, by how much, not to lower it
    proc = prepare(src, tmp_path / "v", "--vocab_size=40", check=False)
    one_line_error(proc, "tokenizer training failed", "raise --vocab_size to at least")
    assert "lower" not in proc.stderr and not (tmp_path / "v" / "manifest.json").exists()
    one_line_error(
        prepare(src, tmp_path / "c", "--score_field=score", "--score_min=2", check=False),
        "no document passed the filter",
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = run(
        "prepare.py",
        "--dataset=EliMC/Ultra-FineWeb",
        "--split=en",
        f"--data_dir={tmp_path / 'd'}",
        check=False,
        env=env,
    )
    one_line_error(proc, "cannot reach the Hugging Face hub", "--input")
    # a folder made with another tokenizer is refused, and left as it was
    prepare(src, tmp_path / "e")
    before = {p.name: p.read_bytes() for p in (tmp_path / "e").iterdir()}
    one_line_error(prepare(src, tmp_path / "e", "--vocab_size=600", check=False), "vocab_size=512", "--overwrite")
    one_line_error(prepare(src, tmp_path / "e", f"--tokenizer={tmp_path / 'a.model'}", check=False), "tokenizer")
    assert {p.name: p.read_bytes() for p in (tmp_path / "e").iterdir()} == before


def test_gpt2_tokenizer_or_a_clear_error(fineweb, tmp_path):
    root, _ = fineweb
    proc = prepare(root / "part-000.parquet", tmp_path / "g", "--tokenizer=gpt2", check=False)
    if proc.returncode == 0:  # tiktoken's GPT-2 files are cached on this machine
        assert json.loads((tmp_path / "g" / "manifest.json").read_text())["tokenizer"]["vocab_size"] == 50257
    else:
        one_line_error(proc, "tiktoken", "not available locally")
