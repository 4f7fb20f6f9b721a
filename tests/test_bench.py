"""bench.py on the CPU with a tiny config: every section runs, the JSON holds consistent figures."""

import json
import sys

from conftest import REPO, TINY, patched, run

TINY_BENCH = [
    "--device=cpu",
    "--n_layer=2",
    "--n_head=2",
    "--n_embd=64",
    "--mlp_hidden=128",
    "--vocab_size=256",
    "--block_size=64",
    "--batch_size=4",
    "--gradient_accumulation_steps=2",
    "--compile_modes=off",
    "--train_steps=2",
    "--optimizer_steps=2",
    "--prompt_len=16",
    "--new_tokens=8",
    "--data_batches=20",
]


def test_bench_runs_on_cpu_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = run("bench.py", *TINY_BENCH, "--peer=true", f"--out={out}")
    r = json.loads(out.read_text())
    # the default sequence lengths are block_size/4, /2 and block_size, at a constant tokens per micro-batch
    assert [(t["seq_len"], t["batch_size"]) for t in r["training"]] == [(16, 16), (32, 8), (64, 4)]
    for t in r["training"]:
        assert t["tok_per_s"] > 0 and t["mfu"] is None  # no MFU without a known peak (CPU)
        assert abs(t["tok_per_s"] * t["step_s"] - t["batch_size"] * t["seq_len"] * 2) < 1e-6 * t["tok_per_s"]
    o = r["optimizer"]
    assert o["muon_step_s"] > 0 and o["adamw_step_s"] > 0 and 0 < o["muon_share_of_step"]
    assert [(g["batch_size"], g["graph"]) for g in r["generation"]] == [(1, False), (8, False)]  # no CUDA graphs on CPU
    assert all(g["decode_tok_per_s"] > 0 and g["prefill_tok_per_s"] > 0 for g in r["generation"])
    assert r["data"]["batches_per_s"] > 0
    # the peer is GPT-2 as nanoGPT counts it: 50304 x 64 tied embedding + 2 blocks of 12 d^2 + 13 d, + final norm
    d = 64
    assert r["peer"]["params"] == 50304 * d + 2 * (12 * d * d + 13 * d) + 2 * d and r["peer"]["tok_per_s"] > 0
    assert (r["peer"]["batch_size"], r["peer"]["seq_len"]) == (12, 64)
    assert "| T=64 | off | 4 x 64 |" in proc.stdout  # the table comes last
    assert proc.stdout.strip().splitlines()[-1].startswith("data:")


def test_bench_trains_as_train_py_calls_the_model(tiny_data, tmp_path):
    """bench.py's training forward runs as train.py's does: under the autocast of the run's precision, on contiguous
    tokens and targets (on a GPU, anything else is another compiled graph: reference.sh's warm-up would compile for
    nothing; once it ran in float32 outside the autocast and no test saw it). bfloat16 on the CPU stands in."""
    bench = [*TINY_BENCH, "--seq_lens=64", "--train_steps=1", "--decode_batches=", f"--out={tmp_path / 'b.json'}"]
    train = [*TINY, f"--data_dir={tiny_data}", f"--out_dir={tmp_path / 'run'}", "--max_iters=2"]
    seen = {}
    for script, args in [("bench.py", bench), ("train.py", train)]:
        record = tmp_path / f"{script}.jsonl"
        patched(script, *args, "--dtype=bfloat16", RECORD_INPUTS=record)
        seen[script] = [json.loads(line) for line in record.read_text().splitlines()]
    assert len(seen["bench.py"]) >= 4 and len(seen["train.py"]) >= 2, seen
    for calls in seen.values():
        assert {json.dumps(c) for c in calls} == {json.dumps({"autocast": "bfloat16", "contiguous": True})}, seen


def test_bench_takes_a_train_config_and_checks_the_command_line(tmp_path):
    """A train.py config's run keys (out_dir, max_iters) are skipped; an unknown --key is still an error."""
    cfg = tmp_path / "cfg.py"
    cfg.write_text("out_dir = 'out/x'\nmax_iters = 5\nrope_theta = 500.0\n")
    proc = run("bench.py", str(cfg), *TINY_BENCH, "--n_layr=3", check=False)
    assert proc.returncode == 2 and "n_layer" in proc.stderr and "Traceback" not in proc.stderr
    args = ["--seq_lens=32", "--graph_modes=", "--doc_len=8", f"--out={tmp_path / 'b.json'}"]
    proc = run("bench.py", str(cfg), *TINY_BENCH, *args)
    r = json.loads((tmp_path / "b.json").read_text())
    assert (
        r["config"]["rope_theta"] == 500.0 and [t["seq_len"] for t in r["training"]] == [32] and r["generation"] == []
    )
    assert r["training"][0]["doc_len"] == 8 and "| T=32, docs of 8 | off | 8 x 32 |" in proc.stdout


def test_bench_and_train_refuse_settings_they_cannot_run(tmp_path):
    """One clear line each: an unknown compile mode, a prompt longer than the context, CUDA graphs off CUDA."""
    for args, words in [
        (["--compile_modes=on,fast"], "compile_modes=on,fast"),
        (["--prompt_len=60"], "over block_size=64"),
        (["--doc_len=16", "--compile_modes=on,graphs"], "doc_len needs compile_modes without graphs"),
        (["--graph_modes=on,fast"], "graph_modes=on,fast"),
    ]:
        proc = run("bench.py", *TINY_BENCH, *args, f"--out={tmp_path / 'b.json'}", check=False)
        assert proc.returncode == 2 and words in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "b.json").exists()
    tail = [
        f"--out_dir={tmp_path / 'run'}",
        f"--data_dir={tmp_path}",
    ]  # a folder that exists: a fresh clone has no data/
    proc = run("train.py", "config/tiny_cpu.py", "--cuda_graphs=true", *tail, check=False)
    assert proc.returncode == 2 and "cuda_graphs=true needs compile=true" in proc.stderr, proc.stderr
    assert not (tmp_path / "run").exists()


def test_bench_under_torchrun_times_the_distributed_muon_step(tmp_path):
    """Two ranks (gloo): both measure, the Muon step is the distributed one (each rank orthogonalises half the
    matrices and all-gathers), and rank 0 alone prints the table and writes the JSON."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    out = tmp_path / "bench.json"
    args = ["--compile_modes=", "--graph_modes=", f"--out={out}"]
    proc = run("torchrun", *TINY_BENCH, *args, cmd=[*torchrun, str(REPO / "bench.py")])
    assert proc.stdout.count("optimizer step: Muon+AdamW") == 1 and proc.stdout.count("bench: ") == 1, proc.stdout
    r = json.loads(out.read_text())
    assert r["optimizer"]["muon_step_s"] > 0 and r["training"] == [] and r["generation"] == []
