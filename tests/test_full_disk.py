"""A full disk (issue 36): one error line naming the folder and the space, no *.tmp left, the files written before
intact, a resumed run bit-equal to one that never stopped, the run folder's space checked before step 0, and
ckpt_best a hard link. The disk fills for real on a small tmpfs where the test may mount one (root on Linux; else
those tests skip), and always through tests/patched.py's FAKE_ENOSPC (a write that fails halfway with ENOSPC) and
FAKE_FREE (shutil.disk_usage's free space)."""

import errno
import json
import os
import re
import shutil
import subprocess

import pytest
import safetensors.torch
import torch
from conftest import TINY, documents_in, patched, run
from test_train import assert_one_line_error

import checkpoints
import disk
import runtime
from model import GPT, GPTConfig

# 8 steps, a checkpoint every 2 keeping 2; validation losses forced up after step 2, so ckpt_best stays step 2's and
# leaves the kept ones at step 6: the case where the best's link holds one checkpoint more
COMMON = [*TINY, "--max_iters=8", "--ckpt_interval=2", "--eval_interval=2", "--keep_last=2"]
RISING = {"FORCE_VAL": "2:1.0"}
STEP = "ckpt_{:07d}.safetensors".format


def train(data, out, *extra, check=True, **seams):
    return patched(
        "train.py", f"--data_dir={data}", f"--out_dir={out}", *COMMON, *extra, check=check, **RISING, **seams
    )


@pytest.fixture(scope="module")
def uninterrupted(tiny_data, tmp_path_factory):
    """The last checkpoint of the run never stopped, that each stopped and resumed run must equal."""
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    train(tiny_data, out)
    return out / STEP(8)


@pytest.fixture
def tmpfs(tmp_path):
    """mount(size) -> a folder on a new tmpfs of size bytes, unmounted after the test; remount(folder, size) resizes
    it. Skips the test where mount is not permitted (not root, a container without CAP_SYS_ADMIN, not Linux)."""
    mounted = []

    def mount(size, name="disk"):
        folder = tmp_path / name
        folder.mkdir()
        cmd = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)]
        proc = subprocess.run(cmd, capture_output=True, text=True) if shutil.which("mount") else None
        if proc is None or proc.returncode != 0:
            why = proc.stderr.strip() if proc else "no mount command"
            pytest.skip(f"cannot mount a tmpfs here ({why}); FAKE_ENOSPC's tests cover a full disk")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", str(folder)], check=True)


def remount(folder, size):
    subprocess.run(["mount", "-o", f"remount,size={size}", str(folder)], check=True)


def assert_same_tensors(a, b):
    """Every tensor of two checkpoints (weights, optimizer state, RNG and data order) equal to the bit."""
    ta, tb = safetensors.torch.load_file(a), safetensors.torch.load_file(b)
    assert ta.keys() == tb.keys() and len(ta) > 20
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


def error_line(proc, folder, name, then):
    """The full-disk error: the folder, the file (name, or any), its size and the free space, as figures."""
    line = proc.stderr.strip()
    assert_one_line_error(proc, f"no space left in {folder} for {name}" + (": it needs " if name else ""), then)
    assert proc.returncode == 2 and re.search(r"it needs [\d.]+ [kMG]?B, [\d.]+ [kMG]?B free; free space there", line)
    return line


def tiny_checkpoint_bytes():
    """checkpoints.checkpoint_bytes of TINY's model (tiny_data's 512 tokens) and its Muon, as the scripts see it."""
    model = GPT(GPTConfig(block_size=64, vocab_size=512, n_layer=2, n_head=2, n_embd=64, mlp_hidden=128))
    return checkpoints.checkpoint_bytes(model, runtime.make_optimizer(model, 0.02, 0.95, 0.006, (0.9, 0.95), 0.0))


def test_full_disk_at_a_save_then_resume_is_bit_equal(tiny_data, tmp_path, uninterrupted):
    """With room for 3.5 checkpoints (FAKE_FREE) the check before step 0 warns: keep_last + 1 fit, ckpt_best's extra
    one may not. Step 6's checkpoint then fails halfway (ENOSPC): one error line with its size and the free space,
    nothing of it left, steps 2 and 4 intact with ckpt_best a hard link to step 2's; resumed, the run ends
    bit-equal to the one never stopped. The rotation then removes step 2's name, and its data lives on in ckpt_best."""
    out, size = tmp_path / "run", uninterrupted.stat().st_size
    proc = train(tiny_data, out, check=False, FAKE_ENOSPC=STEP(6) + ".tmp", FAKE_FREE=int(3.5 * size))
    free = disk.size_text(int(3.5 * size))
    assert f"warning: {out} has {free} free, room for keep_last=2 + 1 checkpoints of " in proc.stdout
    line = error_line(proc, out, STEP(6), "then continue the run with --init_from=resume")
    assert f"it needs {disk.size_text(size)}, {free} free" in line  # step 6's size is step 8's
    assert "step 6: val loss" in proc.stdout and f"saved {out / STEP(4)}" in proc.stdout
    assert sorted(p.name for p in out.iterdir() if "ckpt" in p.name) == [STEP(2), STEP(4), checkpoints.BEST]
    assert not list(out.glob("*.tmp"))
    best, second = os.stat(out / checkpoints.BEST), os.stat(out / STEP(2))
    assert (best.st_ino, best.st_nlink) == (second.st_ino, 2)  # a link, not a second copy
    assert checkpoints.load_checkpoint(out / STEP(4))["iter_num"] == 4
    train(tiny_data, out, "--init_from=resume")
    assert_same_tensors(out / STEP(8), uninterrupted)
    assert sorted(p.name for p in out.glob("ckpt_*")) == [STEP(6), STEP(8), checkpoints.BEST]
    best = out / checkpoints.BEST
    assert os.stat(best).st_nlink == 1 and checkpoints.load_checkpoint(best)["iter_num"] == 2


def test_full_tmpfs_warns_then_stops_then_resumes_bit_equal(tiny_data, tmpfs, uninterrupted):
    """A real disk of 3.5 checkpoints: the check before step 0 warns (keep_last + 1 fit, ckpt_best's extra one may
    not); step 8's save then fills it. Once the disk is larger the resumed run ends as the one never stopped."""
    size = uninterrupted.stat().st_size
    folder = tmpfs(int(3.5 * size) + 64 * 1024)  # and the tokenizer (8 kB), metrics and TensorBoard's events
    out = folder / "run"
    proc = train(tiny_data, out, check=False)
    assert "warning: " in proc.stdout and "room for keep_last=2 + 1 checkpoints" in proc.stdout
    error_line(proc, out, STEP(8), "--init_from=resume")
    assert sorted(p.name for p in out.glob("ckpt_*")) == [STEP(4), STEP(6), checkpoints.BEST]
    assert not list(out.glob("*.tmp"))
    assert checkpoints.load_checkpoint(out / STEP(6))["iter_num"] == 6
    assert checkpoints.load_checkpoint(out / checkpoints.BEST)["iter_num"] == 2
    remount(folder, 8 * size)
    train(tiny_data, out, "--init_from=resume")
    assert_same_tensors(out / STEP(8), uninterrupted)


def test_checkpoint_size_estimate(uninterrupted):
    """What the check before step 0 counts a checkpoint as: a little above the real file (under 10%)."""
    real = uninterrupted.stat().st_size
    assert real < tiny_checkpoint_bytes() < 1.1 * real


@pytest.mark.parametrize("script", ["train.py", "sft.py", "dpo.py"])
def test_too_little_space_is_refused_before_step_0(script, tiny_data, sft_base, sft_run, tmp_path):
    """3 MB free and keep_last=3 of the tiny model's ~1.1 MB checkpoints: refused before any training, with the
    figures and the keep_last that fits."""
    (base, sft_data), (sft, dpo_data) = sft_base, sft_run
    out = tmp_path / "out"
    args = {
        "train.py": [f"--data_dir={tiny_data}", *TINY],
        "sft.py": [f"--init_from={base}", f"--data_dir={sft_data}", "--device=cpu", "--batch_size=4"],
        "dpo.py": [f"--init_from={sft}", f"--data_dir={dpo_data}", "--device=cpu"],
    }[script]
    args += [f"--out_dir={out}", "--max_iters=2", "--keep_last=3"]
    proc = patched(script, *args, check=False, FAKE_FREE=3_000_000)
    size = tiny_checkpoint_bytes()
    assert_one_line_error(
        proc,
        f"{out} has 3.0 MB free, but its checkpoints need {disk.size_text(4 * size)} more: keep_last=3 + 1 of "
        f"{disk.size_text(size)} each; free space there, or use --keep_last=1, another --out_dir",
    )
    assert proc.returncode == 2 and "step 0" not in proc.stdout and not list(out.glob("ckpt_*"))


def test_best_is_a_link_that_outlives_rotation_or_a_copy(tmp_path, monkeypatch):
    """save_checkpoint: ckpt_best is the best step's file (one inode) and keeps its data after rotation removes the
    step's name; where os.link fails (a file system without hard links) it is a copy. A best that cannot be made
    takes its step checkpoint with it (that checkpoint records itself as the best)."""

    def save(step, is_best, keep_last=1):
        state = {"model": {"w": torch.full((1000,), float(step))}, "model_args": {}, "iter_num": step}
        return checkpoints.save_checkpoint(tmp_path, step, state, keep_last, is_best)

    best = tmp_path / checkpoints.BEST
    assert os.stat(save(2, True)).st_ino == os.stat(best).st_ino
    save(4, False)
    assert not (tmp_path / STEP(2)).exists() and checkpoints.load_checkpoint(best)["iter_num"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [STEP(4), checkpoints.BEST]

    def no_links(src, dst):
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))

    monkeypatch.setattr(os, "link", no_links)
    path = save(6, True)
    assert os.stat(path).st_ino != os.stat(best).st_ino and path.read_bytes() == best.read_bytes()

    def full(src, dst, then):
        raise disk.no_space(tmp_path, dst.name, 1000, then)

    monkeypatch.setattr(disk, "link_or_copy", full)
    with pytest.raises(runtime.UserError, match="no space left"):
        save(8, True, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [STEP(6), checkpoints.BEST]


class HalfWrite:
    """A file on a full disk, as tests/patched.py's FAKE_ENOSPC makes one: the write keeps half, then fails."""

    def __init__(self, f):
        self.f = f

    def write(self, data):
        self.f.write(memoryview(data)[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_full_disk_at_an_append_leaves_whole_lines(tmp_path, monkeypatch):
    """metrics.jsonl (and near_dup.keys) take whole records or nothing: an append that fails halfway is cut back
    to the lines before, and is one error line; write_atomic leaves the old file and no .tmp."""
    log = runtime.MetricsLog(tmp_path)
    log.log({"step": 0, "val_loss": 6.0})
    monkeypatch.setattr(disk, "open", lambda *a, **k: HalfWrite(open(*a, **k)), raising=False)
    with pytest.raises(runtime.UserError, match=f"no space left in {tmp_path} for metrics.jsonl: it needs 37 B, "):
        log.log({"step": 1, "loss": 5.5, "lr": 0.01})
    log.close()
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 0, "val_loss": 6.0}\n'
    (tmp_path / "report.md").write_text("old")
    with pytest.raises(runtime.UserError, match="for report.md: it needs 3 B,"):
        disk.write_atomic(tmp_path / "report.md", b"new")
    assert (tmp_path / "report.md").read_text() == "old" and not list(tmp_path.glob("*.tmp"))


def test_prepare_full_disk_continues(tiny_data, tmp_path):
    """prepare.py's second training shard fails halfway: one error line with its size (20,000 uint16 tokens and the
    header), no partial file, the manifest whole and naming only the shards on disk; the same command then
    continues to the documents of tiny_data (made in one go with the same tokenizer)."""
    out = tmp_path / "data"
    args = [f"--input={tiny_data.parent / 'src'}", f"--data_dir={out}", "--val_permille=100", "--shard_tokens=20000"]
    args.append(f"--tokenizer={tiny_data / 'tokenizer.model'}")
    proc = patched("prepare.py", *args, check=False, FAKE_ENOSPC="train_000001.bin.tmp")
    line = error_line(proc, out, "train_000001.bin", "then run the same command again")
    assert "it needs 40.0 kB" in line
    manifest = json.loads((out / "manifest.json").read_text())
    assert not list(out.glob("*.tmp")) and not manifest["complete"]
    assert sorted(p.name for p in out.glob("*.bin")) == sorted(s["name"] for s in manifest["shards"])
    assert "train_000000.bin" in {s["name"] for s in manifest["shards"]}
    run("prepare.py", *args)
    assert documents_in(out)[0] == documents_in(tiny_data)[0]


def test_prepare_on_a_full_tmpfs(tiny_data, tmpfs):
    """A real 128 kB disk: prepare.py stops at the shard that does not fit, with no partial file and every shard the
    manifest names whole."""
    out = tmpfs(128 * 1024) / "data"
    args = [f"--input={tiny_data.parent / 'src'}", f"--data_dir={out}", "--val_permille=100", "--shard_tokens=20000"]
    proc = run("prepare.py", *args, f"--tokenizer={tiny_data / 'tokenizer.model'}", check=False)
    error_line(proc, out, "", "then run the same command again")
    assert not list(out.glob("*.tmp"))
    for shard in json.loads((out / "manifest.json").read_text())["shards"]:
        assert (out / shard["name"]).stat().st_size == 32 + 2 * shard["tokens"]


def metrics_run(folder):
    """A run folder with a metrics.jsonl of 10 steps: all eval.py --tasks=curves reads."""
    folder.mkdir(parents=True, exist_ok=True)
    records = [
        {"step": s, "loss": 6 - s / 5, "val_loss": 6.1 - s / 5, "tokens": 1000 * s, "elapsed_s": s}
        for s in range(1, 11)
    ]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def test_eval_full_disk(tmp_path):
    """eval.py's report card on a full disk at report.md, its last file: one error line, nothing of report.md, no
    *.tmp; the files before it whole."""
    folder = metrics_run(tmp_path / "run")
    proc = patched("eval.py", f"--out_dir={folder}", "--tasks=curves", check=False, FAKE_ENOSPC="report.md.tmp")
    error_line(proc, folder, "report.md", "then run eval.py again")
    assert sorted(os.listdir(folder)) == ["curves.png", "metrics.jsonl", "report.json"]
    assert json.loads((folder / "report.json").read_text())["curves"] == "curves.png"


def test_eval_on_a_full_tmpfs(tmpfs):
    """A real disk that holds metrics.jsonl and little more: curves.png (~40 kB) does not fit."""
    folder = metrics_run(tmpfs(12 * 1024))
    proc = run("eval.py", f"--out_dir={folder}", "--tasks=curves", check=False)
    error_line(proc, folder, "curves.png", "then run eval.py again")
    assert sorted(os.listdir(folder)) == ["metrics.jsonl"]
