"""The whole pipeline in tiny form, run as a user runs it: prepare -> train -> sample, as subprocesses.

prepare.py builds the default corpus (this Python's standard library, no download) into a temporary folder.
"""

import importlib.util
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "tests"))
from conftest import TINY, run  # noqa: E402


def test_prepare_train_sample(tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    proc = run("prepare.py", f"--data_dir={data}", "--vocab_size=1024")
    assert "standard library" in proc.stdout and "done:" in proc.stdout
    manifest = json.loads((data / "manifest.json").read_text())
    tokens = {s: sum(sh["tokens"] for sh in manifest["shards"] if sh["split"] == s) for s in ("train", "val")}
    assert manifest["complete"] and tokens["train"] > 1_000_000 and tokens["val"] > 100_000

    run(
        "train.py",
        "config/tiny_cpu.py",
        f"--data_dir={data}",
        f"--out_dir={out}",
        *TINY,
        "--max_iters=60",
        "--eval_interval=60",
        "--ckpt_interval=60",
        "--n_embd=128",
        "--mlp_hidden=384",
        "--learning_rate=0.01",
    )
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val = {r["step"]: r["val_loss"] for r in records if "val_loss" in r}
    assert abs(val[0] - 6.93) < 0.3  # ln(1024) at init
    assert val[60] < val[0] - 1.5, val  # it learned something
    assert all({"loss", "tok_per_s", "mem_gib"} <= set(r) for r in records if "loss" in r)
    if importlib.util.find_spec("tensorboard"):  # optional dependency (in the test extra)
        assert list((out / "tb").iterdir()), "TensorBoard event files"

    proc = run("sample.py", f"--out_dir={out}", "--start=def ", "--max_new_tokens=30", "--num_samples=2")
    samples = proc.stdout.split("-" * 80)
    assert len(samples) == 3 and all(s.strip().startswith("def") for s in samples[:2])
    assert len(samples[0].strip()) > 30  # text came out after the prompt
