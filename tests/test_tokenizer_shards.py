import numpy as np
import pytest
import torch
from conftest import stdlib_sample

from shards import HEADER, ShardError, TokenWindows, open_shard, read_header, write_shard
from tokenizer import SPECIAL_TOKENS, Tokenizer

TRICKY = [
    "",
    "    def f(self):\n\treturn 1\r\n",
    "  leading and trailing spaces  ",
    "\n\n\n",
    "a \u2581 b \u2581\u2581",  # SentencePiece's own space symbol, literally
    "<|user|> is plain text here",
    "emoji \U0001f600, CJK \u4e2d\u6587, NUL \x00, combining e\u0301",
]


@pytest.fixture(scope="module")
def tok(tiny_data):
    return Tokenizer(str(tiny_data / "tokenizer.model"))


@pytest.mark.parametrize("text", TRICKY)
def test_round_trip_tricky_text(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_round_trip_every_document(tok):
    texts = [t for _, t in stdlib_sample()] + TRICKY
    assert [tok.decode(ids) for ids in tok.encode_batch(texts)] == texts


def test_special_tokens_have_fixed_ids_and_cannot_be_forged(tok):
    assert [tok.special[s] for s in SPECIAL_TOKENS] == [1, 2, 3, 4, 5]
    assert not set(tok.encode("<|endoftext|><|user|><|assistant|><|end|>")) & {1, 2, 3, 4, 5}
    assert tok.decode([tok.bos_id] + tok.encode("x")) == "x"


def test_prepared_shards_start_documents_with_boundary(tiny_data, tok):
    tokens = open_shard(tiny_data / "train_000000.bin", tok.vocab_size)
    assert tokens[0] == tok.bos_id
    n_docs = int((np.asarray(tokens) == tok.bos_id).sum())
    assert n_docs > 40  # 60 files, ~10% held out for validation
    assert read_header(tiny_data / "val_000000.bin")["vocab_size"] == 512


def test_shard_header_and_checks(tmp_path):
    path = tmp_path / "train_000000.bin"
    write_shard(path, np.arange(1000) % 300, vocab_size=300)
    h = read_header(path)
    assert (h["itemsize"], h["vocab_size"], h["n_tokens"]) == (2, 300, 1000)
    assert path.stat().st_size == HEADER.size + 2000
    assert list(open_shard(path, 300)[:3]) == [0, 1, 2]
    with pytest.raises(ShardError, match="vocab_size=300"):
        open_shard(path, 512)
    big = tmp_path / "big.bin"
    write_shard(big, [70000, 1], vocab_size=100_000)
    assert read_header(big)["itemsize"] == 4 and list(open_shard(big)) == [70000, 1]
    with open(path, "r+b") as f:
        f.truncate(HEADER.size + 999)
    with pytest.raises(ShardError, match="truncated"):
        read_header(path)
    with pytest.raises(ShardError, match="outside the vocabulary"):
        write_shard(tmp_path / "x.bin", [5, 300], vocab_size=300)


def test_windows_cover_all_shards_and_are_reproducible(tmp_path):
    write_shard(tmp_path / "train_000000.bin", np.zeros(100), vocab_size=10)
    write_shard(tmp_path / "train_000001.bin", np.ones(300), vocab_size=10)
    a = TokenWindows(tmp_path, "train", 9, 10, seed=0)
    starts = a.sample_starts(4000)
    x, y = a.gather(starts)
    assert x.shape == (4000, 9) and torch.equal(x[:, 1:], y[:, :-1])
    # uniform over window starts: 90 of 380 starts lie in the first shard
    share = (x[:, 0] == 0).float().mean().item()
    assert abs(share - 90 / 380) < 0.03
    b = TokenWindows(tmp_path, "train", 9, 10, seed=0)
    assert np.array_equal(b.sample_starts(4000), starts)
    with pytest.raises(ShardError, match="shorter than block_size"):
        TokenWindows(tmp_path, "train", 400, 10, seed=0)


def read_pass(windows, T, chunk):
    """One pass of an epoch-order TokenWindows (its len(windows.windows) windows) read in draws of `chunk` windows,
    as rows of T tokens: (x, y) of all rows in order."""
    n = len(windows.windows)
    rows = [
        windows.gather(windows.sample_starts(k * windows.block_size // T, T), T)
        for k in [chunk] * (n // chunk) + [n % chunk]
        if k
    ]
    return torch.cat([x for x, _ in rows]), torch.cat([y for _, y in rows])


def test_epoch_order_reads_every_token_once_a_pass(tmp_path):
    """Two shards of 650 tokens whose values are their positions (0-649, 650-1299): with block_size=16 each holds
    40 windows of 17 tokens at stride 16, 80 in all. A pass makes every position 1-640 and 651-1290 a target exactly
    once (the first token of a shard is never one, a tail under a window is left), in a shuffled order that the next
    pass and another seed change. Rows of 8 tokens (block_size_schedule's shorter T) read the same tokens in the
    same order. A reader resumed from state() mid-pass draws what the uninterrupted one draws, into the next pass."""
    write_shard(tmp_path / "train_000000.bin", np.arange(650), vocab_size=2000)
    write_shard(tmp_path / "train_000001.bin", np.arange(650, 1300), vocab_size=2000)
    a = TokenWindows(tmp_path, "train", 16, 2000, seed=0, order="epoch")
    x, y = read_pass(a, 16, chunk=12)
    assert len(a.windows) == 80 and x.shape == (80, 16) and torch.equal(y - x, torch.ones_like(x))  # one shard each
    targets = np.sort(y.reshape(-1).numpy())
    assert np.array_equal(targets, np.r_[1:641, 651:1291])  # every position once: no repeat, none missed
    first = x[:, 0].numpy()
    assert not np.array_equal(first, np.sort(first))  # shuffled
    x2, y2 = read_pass(a, 16, chunk=12)  # pass 2: the same tokens, another order
    assert np.array_equal(np.sort(y2.reshape(-1).numpy()), targets) and not torch.equal(x2, x)
    assert (a.epoch, a.index) == (1, 80)
    assert not torch.equal(read_pass(TokenWindows(tmp_path, "train", 16, 2000, 1, "epoch"), 16, 80)[0], x)  # seed
    # shorter rows: each window cut into 2 rows of 8, the pass's tokens in the same order
    x8, y8 = read_pass(TokenWindows(tmp_path, "train", 16, 2000, 0, "epoch"), 8, chunk=7)
    assert x8.shape == (160, 8) and torch.equal(y8.reshape(-1), y.reshape(-1))
    # resume mid-pass: another seed at construction, the state's seed and place win
    b = TokenWindows(tmp_path, "train", 16, 2000, seed=0, order="epoch")
    b.sample_starts(50)
    state = b.state()
    assert state == {"seed": 0, "epoch": 0, "index": 50}
    ahead = b.sample_starts(60)  # across the end of the pass
    c = TokenWindows(tmp_path, "train", 16, 2000, seed=5, order="epoch")
    c.set_state(state)
    assert np.array_equal(c.sample_starts(60), ahead) and c.state() == {"seed": 0, "epoch": 1, "index": 30}
    # a checkpoint of the other order is refused by name
    with pytest.raises(ShardError, match="data_order=random"):
        c.set_state(torch.Generator().get_state())
    with pytest.raises(ShardError, match="data_order=epoch"):
        TokenWindows(tmp_path, "train", 16, 2000, seed=0).set_state(state)


def test_prepare_is_reproducible_and_idempotent(tiny_data, tmp_path):
    from conftest import run

    src = tiny_data.parent / "src"
    again = tmp_path / "again"
    run("prepare.py", f"--input={src}", f"--data_dir={again}", "--vocab_size=512", "--val_permille=100")
    for name in ("tokenizer.model", "train_000000.bin", "val_000000.bin"):
        assert (again / name).read_bytes() == (tiny_data / name).read_bytes(), name
    # the same command on a finished folder does nothing; other settings are refused, nothing overwritten
    before = (again / "train_000000.bin").stat().st_mtime_ns
    assert (
        "nothing to do"
        in run("prepare.py", f"--input={src}", f"--data_dir={again}", "--vocab_size=512", "--val_permille=100").stdout
    )
    proc = run("prepare.py", f"--input={src}", f"--data_dir={again}", "--vocab_size=600", check=False)
    assert proc.returncode != 0 and proc.stderr.startswith("error: ") and "--overwrite=true" in proc.stderr
    assert (again / "train_000000.bin").stat().st_mtime_ns == before


def test_prepare_input_errors(tmp_path):
    from conftest import run

    (tmp_path / "a.jsonl").write_text('{"content": "hello"}\n{"content": "world"}\n')
    proc = run("prepare.py", f"--input={tmp_path / 'a.jsonl'}", f"--data_dir={tmp_path / 'd'}", check=False)
    assert proc.returncode != 0 and "no field 'text'" in proc.stderr and "content" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = run("prepare.py", f"--input={tmp_path / 'missing'}", check=False)
    assert proc.returncode != 0 and "no .txt, .jsonl or .parquet files" in proc.stderr
