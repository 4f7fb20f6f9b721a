"""Files a user hands over that are not what they should be (issue 27), in one table: each is answered by exactly
one `error:` line and exit status 2, never a traceback, and nothing is written. The scripts run in this process to
the end (tests/test_fuzz_config.py's runner, not stopped), as `python script ...` would: the error escapes the script
and its own error handler (the sys.excepthook that runtime.install_error_handler set) writes the line and exits.
"""

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import safetensors.torch
import torch
from conftest import TINY, run
from test_fuzz_config import assert_answered, run_in_process, snapshot

import checkpoints
from shards import write_shard


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    """A two-step run of the tiny model: a checkpoint and a tokenizer to spoil."""
    out = tmp_path_factory.mktemp("bad_files") / "run"
    run("train.py", f"--data_dir={tiny_data}", f"--out_dir={out}", *TINY, "--max_iters=2", "--eval_interval=2")
    return out


def copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def truncated_shard(d):
    shard = copy(d.data, d.tmp / "data") / "train_000000.bin"
    shard.write_bytes(shard.read_bytes()[:-999])
    return "train.py", [f"--data_dir={d.tmp / 'data'}", *d.train], "is truncated or padded"


def shard_of_another_vocabulary(d):
    data = copy(d.data, d.tmp / "data")
    write_shard(data / "train_000000.bin", np.arange(5000) % 300, vocab_size=300)
    return "train.py", [f"--data_dir={data}", *d.train, "--vocab_size=512"], "vocab_size=300"


def empty_shard(d):
    data = copy(d.data, d.tmp / "data")
    (data / "train_000000.bin").write_bytes(b"")
    return "train.py", [f"--data_dir={data}", *d.train], "too short to be a shard"


def corrupted_checkpoint(d):
    ckpt = copy(d.run, d.tmp / "run") / checkpoints.BEST
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    return "sample.py", [f"--out_dir={d.tmp / 'run'}", "--ckpt=best", *d.sample], "truncated or corrupted"


def checkpoint_not_ours(d):
    out = copy(d.run, d.tmp / "run")
    safetensors.torch.save_file({"w": torch.zeros(2)}, out / "foreign.safetensors")
    return "sample.py", [f"--out_dir={out}", "--ckpt=foreign.safetensors", *d.sample], "not an AnarchoBot checkpoint"


def checkpoint_that_is_text(d):
    out = copy(d.run, d.tmp / "run")
    (out / checkpoints.BEST).write_text("not a checkpoint\n")
    return "export.py", [f"--out_dir={out}", f"--hf_dir={d.tmp / 'hf'}"], "truncated or corrupted"


def tokenizer_that_is_not_one(d):
    out = copy(d.run, d.tmp / "run")
    (out / "tokenizer.model").write_bytes(b"\x00garbage, not a SentencePiece model")
    return "sample.py", [f"--out_dir={out}", *d.sample], "tokenizer.model is not a tokenizer"


def reused_tokenizer_that_is_not_one(d):
    (d.tmp / "my.model").write_text("hello\n")
    args = [f"--input={d.src}", f"--data_dir={d.tmp / 'data'}", f"--tokenizer={d.tmp / 'my.model'}"]
    return "prepare.py", args, "my.model is not a tokenizer"


def jsonl_line_that_is_not_json(d):
    (d.tmp / "in").mkdir()
    (d.tmp / "in" / "a.jsonl").write_text('{"text": "def f(): pass"}\n{"text": "unclosed\n')
    return "prepare.py", [f"--input={d.tmp / 'in'}", f"--data_dir={d.tmp / 'data'}"], "cannot be read (JSON parse error"


def parquet_with_wrong_columns(d):
    (d.tmp / "in").mkdir()
    pd.DataFrame({"content": ["def f(): pass"] * 10}).to_parquet(d.tmp / "in" / "a.parquet")
    return "prepare.py", [f"--input={d.tmp / 'in'}", f"--data_dir={d.tmp / 'data'}"], "no field 'text'"


def sft_jsonl_without_messages(d):
    (d.tmp / "in").mkdir()
    (d.tmp / "in" / "a.jsonl").write_text(json.dumps({"messages": "hello"}) + "\n")
    args = [f"--input={d.tmp / 'in'}", f"--data_dir={d.tmp / 'data'}", "--mode=sft", f"--tokenizer={d.tok}"]
    return "prepare.py", args, "messages"


def config_file_that_is_not_python(d):
    (d.tmp / "c.py").write_text("n_layer = = 2\n")
    return "train.py", [str(d.tmp / "c.py")], "failed to run"


def metrics_that_are_not_json(d):
    out = copy(d.run, d.tmp / "run")
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo\n')
    return "eval.py", [f"--out_dir={out}", "--tasks=curves"], "metrics.jsonl"


def manifest_that_is_not_json(d):
    data = copy(d.data, d.tmp / "data")
    (data / "manifest.json").write_text("{not json")
    return "prepare.py", [f"--input={d.src}", f"--data_dir={data}", "--vocab_size=512"], "manifest.json"


CASES = [
    truncated_shard,
    shard_of_another_vocabulary,
    empty_shard,
    corrupted_checkpoint,
    checkpoint_not_ours,
    checkpoint_that_is_text,
    tokenizer_that_is_not_one,
    reused_tokenizer_that_is_not_one,
    jsonl_line_that_is_not_json,
    parquet_with_wrong_columns,
    sft_jsonl_without_messages,
    config_file_that_is_not_python,
    metrics_that_are_not_json,
    manifest_that_is_not_json,
]


class Given:
    """What a case spoils: copies of the tiny data folder and run folder, in its own tmp folder."""

    def __init__(self, tmp, data, run):
        self.tmp, self.data, self.run, self.src = tmp, data, run, data.parent / "src"
        self.tok = data / "tokenizer.model"
        self.train = [f"--out_dir={tmp / 'out'}", *TINY, "--max_iters=1"]
        self.sample = ["--device=cpu", "--max_new_tokens=2", "--num_samples=1"]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_a_bad_file_is_one_error_line(case, tiny_data, trained, tmp_path):
    script, argv, words = case(Given(tmp_path, tiny_data, trained))
    before = snapshot(tmp_path)
    status, stdout, stderr = run_in_process(script, argv, tmp_path, stop=False)
    assert_answered(status, stdout, stderr, f"{case.__name__}: python {script} {' '.join(argv)}")
    assert status == 2 and words in stderr, stderr
    assert snapshot(tmp_path) == before, f"{case.__name__}: python {script} wrote a file"
