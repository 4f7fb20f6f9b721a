"""Token shards: the on-disk format written by prepare.py and read by every trainer.

A shard is a 32-byte header followed by the tokens, so np.memmap reads it with no copy:

    offset  size  field
    0       8     magic b"ANBTOKS\\0"
    8       4     format version (uint32, little-endian)
    12      4     bytes per token: 2 (uint16) or 4 (uint32)
    16      8     vocabulary size of the tokenizer that wrote it (uint64)
    24      8     number of tokens (uint64)

A data folder holds tokenizer.model, train_*.bin and val_*.bin. SFT data adds a loss mask beside each token
shard ({split}_*.mask, same format, vocabulary 2). DPO data holds each pair's prompt, chosen completion and
rejected completion in turn in the token shards, and their three lengths per pair in {split}.pairs (same
format, "vocabulary" = the longest length + 1).
"""

import os
import struct
from pathlib import Path

import numpy as np
import torch

import disk

MAGIC = b"ANBTOKS\0"
VERSION = 1
HEADER = struct.Struct("<8sIIQQ")  # 32 bytes


class ShardError(ValueError):
    """A shard or data folder a trainer cannot use; the message says what to do."""


def token_dtype(vocab_size):
    return np.uint16 if vocab_size <= 2**16 else np.uint32


def write_shard(path, tokens, vocab_size, then="run the same command again"):
    """Write tokens atomically (disk.write_atomic): a reader never sees a half-written shard under the final name,
    and a full disk stops prepare.py with one error line, `then` its advice (pretraining data: the manifest records
    the shards before, so the same command continues from there)."""
    dtype = token_dtype(vocab_size)
    tokens = np.asarray(tokens)
    if tokens.size and int(tokens.max()) >= vocab_size:
        raise ShardError(f"token id {int(tokens.max())} is outside the vocabulary of {vocab_size}")
    header = HEADER.pack(MAGIC, VERSION, np.dtype(dtype).itemsize, vocab_size, tokens.size)
    disk.write_atomic(path, [header, np.ascontiguousarray(tokens, dtype=dtype)], then)


def write_split(out, split, vocab_size, shard_tokens, tokens, mask=None, lengths=None):
    """Write one split of SFT or DPO data: tokens in shards of shard_tokens, SFT's loss mask beside each,
    DPO's pair lengths in one file. Returns the token shards' manifest entries. The manifest is written after them
    all, so a full disk (one error line) leaves a folder the same command refuses: it says --overwrite=true."""
    entries, then = [], "run the same command with --overwrite=true"
    for j, a in enumerate(range(0, len(tokens), shard_tokens)):
        name = f"{split}_{j:06d}"
        if mask is not None:
            write_shard(Path(out) / f"{name}.mask", mask[a : a + shard_tokens], 2, then)
        write_shard(Path(out) / f"{name}.bin", tokens[a : a + shard_tokens], vocab_size, then)
        entries.append({"name": f"{name}.bin", "split": split, "tokens": len(tokens[a : a + shard_tokens])})
    if lengths is not None:
        write_shard(Path(out) / f"{split}.pairs", lengths, max(lengths) + 1, then)
    return entries


def read_header(path):
    with open(path, "rb") as f:
        raw = f.read(HEADER.size)
    if len(raw) < HEADER.size:
        raise ShardError(f"{path} is too short to be a shard; re-run prepare.py")
    magic, version, itemsize, vocab_size, n_tokens = HEADER.unpack(raw)
    if magic != MAGIC:
        raise ShardError(f"{path} is not an AnarchoBot token shard (bad magic); re-run prepare.py")
    if version != VERSION:
        raise ShardError(f"{path} has shard format v{version}, this code reads v{VERSION}; re-run prepare.py")
    if itemsize not in (2, 4):
        raise ShardError(f"{path} has an unknown token width {itemsize}; re-run prepare.py")
    expected = HEADER.size + itemsize * n_tokens
    if os.path.getsize(path) != expected:
        raise ShardError(f"{path} is truncated or padded ({os.path.getsize(path)} bytes, header says {expected})")
    return {"itemsize": itemsize, "vocab_size": vocab_size, "n_tokens": n_tokens}


def open_shard(path, vocab_size=None):
    """Memory-map one shard's tokens, refusing a shard written for another vocabulary."""
    h = read_header(path)
    if vocab_size is not None and h["vocab_size"] != vocab_size:
        raise ShardError(
            f"{path} was tokenized with a {h['vocab_size']}-token vocabulary but the model has "
            f"vocab_size={vocab_size}; set vocab_size={h['vocab_size']} or re-run prepare.py"
        )
    dtype = np.uint16 if h["itemsize"] == 2 else np.uint32
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER.size, shape=(h["n_tokens"],))


def find_shards(data_dir, split):
    if not Path(data_dir).is_dir():
        raise ShardError(
            f"data folder {data_dir} does not exist; check --data_dir, or run `python prepare.py` to make it"
        )
    paths = sorted(Path(data_dir).glob(f"{split}_*.bin"))
    if not paths:
        raise ShardError(f"no {split}_*.bin shards in {data_dir}; run `python prepare.py` to make them")
    return paths


class TokenWindows:
    """(input, target) windows of block_size tokens across all shards of a split, in one of two orders.

    random (nanoGPT's): every window start equally likely, whichever shard it lies in, drawn with replacement from a
    torch.Generator: windows overlap and some tokens are never read (~8% at the reference budget, 2.6 draws a token).
    epoch (nanochat's, modded-nanogpt's): each shard cut into windows of block_size + 1 tokens at stride block_size,
    so each token is a target once a pass; a pass reads them in a permutation of (seed, pass), the next pass in
    another. state() is the data position: save it in a checkpoint and a resumed run sees the same batches.
    """

    def __init__(self, data_dir, split, block_size, vocab_size, seed, order="random"):
        self.block_size, self.order, self.seed = block_size, order, seed
        self.shards = [open_shard(p, vocab_size) for p in find_shards(data_dir, split)]
        starts_per_shard = [max(len(s) - block_size - 1, 0) for s in self.shards]
        if sum(starts_per_shard) == 0:
            longest = max(len(s) for s in self.shards)
            raise ShardError(
                f"the {split} shards in {data_dir} are shorter than block_size+1={block_size + 1} tokens "
                f"(longest: {longest}); lower block_size or prepare more data"
            )
        self.n_tokens = sum(len(s) for s in self.shards)
        self.generator = torch.Generator().manual_seed(seed)
        if order == "random":  # a start g is offset g - cum[i] of shard i: numbered across the shards' starts
            self.cum = np.cumsum([0] + starts_per_shard)
        else:  # a start is a token's position in the shards laid end to end
            self.cum = np.cumsum([0] + [len(s) for s in self.shards])
            self.windows = np.concatenate(
                [self.cum[i] + block_size * np.arange((len(s) - 1) // block_size) for i, s in enumerate(self.shards)]
            )
            self.set_state({"seed": seed, "epoch": 0, "index": 0})

    def permutation(self, epoch):
        """The order of the windows in pass `epoch` (from 0): a function of the seed and the pass alone."""
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.windows))

    def state(self):
        """The data position for a checkpoint: random, the generator's state (as checkpoints have always held);
        epoch, the pass, the next window's place in its permutation, and the seed that made the permutations."""
        if self.order == "random":
            return self.generator.get_state()
        return {"seed": self.seed, "epoch": self.epoch, "index": self.index}

    def set_state(self, state):
        if self.order == "random" and isinstance(state, torch.Tensor):
            self.generator.set_state(state)
            return
        if self.order == "random" or isinstance(state, torch.Tensor):
            made = "epoch" if self.order == "random" else "random"
            raise ShardError(f"the checkpoint was made with data_order={made}; resume with --data_order={made}")
        self.seed, self.epoch, self.index = state["seed"], state["epoch"], state["index"]
        self.perm = self.permutation(self.epoch)

    def sample_starts(self, n, T=None):
        """n global starts of windows of T <= block_size tokens (block_size unless given); ranks that draw in the same
        order see the same sequence. epoch: the next n * T / block_size windows of the permutation, each cut into
        block_size / T rows of T tokens (a divisor: block_size_schedule's rule), so a pass reads every token once."""
        if self.order == "random":
            return torch.randint(int(self.cum[-1]), (n,), generator=self.generator).numpy()
        T = T or self.block_size
        cuts = self.block_size // T
        if self.block_size % T or n % cuts:
            raise ValueError(f"epoch order: {n} rows of {T} tokens do not fill whole windows of {self.block_size}")
        picks, need = [self.perm[:0]], n // cuts
        while need:
            if self.index == len(self.perm):  # this pass is read: the next one, in a new order
                self.epoch, self.index = self.epoch + 1, 0
                self.perm = self.permutation(self.epoch)
            take = min(need, len(self.perm) - self.index)
            picks.append(self.perm[self.index : self.index + take])
            self.index, need = self.index + take, need - take
        starts = self.windows[np.concatenate(picks)]
        return (starts[:, None] + T * np.arange(cuts)).reshape(-1)  # (windows x cuts) rows, a window's rows together

    def gather(self, starts, T=None):
        """Rows of (x, y) int64 tensors for the given global window starts, of T <= block_size tokens (block_size
        unless given: starts are drawn for block_size, so a shorter window fits too)."""
        T = T or self.block_size
        rows = []
        for g in starts:
            i = int(np.searchsorted(self.cum, g, side="right")) - 1
            off = int(g - self.cum[i])
            rows.append(torch.from_numpy(self.shards[i][off : off + T + 1].astype(np.int64)))
        xy = torch.stack(rows)  # (B, T+1)
        return xy[:, :-1].contiguous(), xy[:, 1:].contiguous()  # as a copy to a GPU makes them (one compiled graph)


def open_pairs(data_dir, split, vocab_size):
    """DPO data: (tokens of all the split's shards, int64; (n_pairs, 3) prompt/chosen/rejected lengths)."""
    path = Path(data_dir) / f"{split}.pairs"
    if not path.is_file():
        raise ShardError(f"{path} not found; make DPO data with prepare.py --mode=dpo")
    tokens = np.concatenate(
        [np.asarray(open_shard(p, vocab_size), dtype=np.int64) for p in find_shards(data_dir, split)]
    )
    lengths = np.asarray(open_shard(path), dtype=np.int64)
    if len(lengths) % 3 or lengths.sum() != len(tokens):
        raise ShardError(f"{path} does not match the {split} token shards beside it; re-run prepare.py --mode=dpo")
    return tokens, lengths.reshape(-1, 3)


def pair_rows(data_dir, split, vocab_size, block_size):
    """DPO pairs as (prompt, chosen, rejected) int64 arrays, and how many were dropped because the prompt and the
    longer completion (less its last token, never an input) do not fit block_size (prepare.py's may be larger)."""
    tokens, lengths = open_pairs(data_dir, split, vocab_size)
    starts = np.cumsum(lengths.sum(1)) - lengths.sum(1)
    rows = [
        (tokens[a : a + p], tokens[a + p : a + p + c], tokens[a + p + c : a + p + c + r])
        for a, (p, c, r) in zip(starts, lengths, strict=True)
        if p + max(c, r) - 1 <= block_size
    ]
    return rows, len(lengths) - len(rows)


def collate_pairs(pairs):
    """(x, y) of 2 x len(pairs) rows: prompt + chosen of each pair, then prompt + rejected, padded to the longest.
    Targets are -1 except on the completion, so a row's summed log-probability is its completion's."""
    seqs = [np.concatenate([p, c]) for p, c, _ in pairs] + [np.concatenate([p, r]) for p, _, r in pairs]
    prompts = [len(p) for p, _, _ in pairs] * 2
    T = max(len(s) for s in seqs) - 1
    X = torch.zeros(len(seqs), T, dtype=torch.long)
    Y = torch.full((len(seqs), T), -1, dtype=torch.long)
    for i, (s, n) in enumerate(zip(seqs, prompts, strict=True)):
        X[i, : len(s) - 1] = torch.from_numpy(s[:-1])
        Y[i, n - 1 : len(s) - 1] = torch.from_numpy(s[n:])
    return X, Y
