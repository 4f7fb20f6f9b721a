"""SentencePiece BPE tokenizer that round-trips text exactly, with reserved special tokens.

decode(encode(text)) == text for every string: no normalisation, no dummy prefix, no whitespace folding,
byte fallback for anything outside the vocabulary. The special tokens are SentencePiece *control* symbols:
they have fixed ids, decode to nothing, and can never be produced by encoding user text, so a document that
happens to contain "<|user|>" cannot forge a chat turn.
"""

import io
from pathlib import Path

import sentencepiece as spm

import runtime
from runtime import UserError

# Fixed ids 1..5 (0 is <unk>, which byte fallback makes unreachable). SFT uses the chat ones.
BOS = "<|endoftext|>"  # document boundary: every document starts with it
SPECIAL_TOKENS = [BOS, "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]

# SentencePiece writes spaces as U+2581 and turns that character back into a space on decode, so a literal
# U+2581 in the text would come back as a space. We encode it as its three UTF-8 byte tokens instead.
META_SPACE = "\u2581"


def train_tokenizer(lines, vocab_size, max_lines=1_000_000):
    """Train a BPE model on a list of text lines; returns the serialized model (bytes).

    Beyond max_lines we keep every k-th line ourselves: SentencePiece's own sampling is seeded differently in
    every process, which made two identical prepare.py runs give different tokenizers.
    """
    if len(lines) > max_lines:
        lines = lines[:: -(-len(lines) // max_lines)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        normalization_rule_name="identity",  # exact round trip: no NFKC, no case folding
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,  # indentation runs become single tokens
        split_digits=True,
        byte_fallback=True,
        character_coverage=0.9999,
        unk_id=0,
        bos_id=-1,
        eos_id=-1,
        pad_id=-1,
        control_symbols=SPECIAL_TOKENS,
        max_sentence_length=16384,
        num_threads=2,
        minloglevel=2,
    )
    return model.getvalue()


TOKENIZER_FILES = ("tokenizer.model", "tokenizer.tiktoken")  # what a data or run folder may hold


def find_tokenizer(folder):
    """The tokenizer file in a data or run folder, or None."""
    return next((Path(folder) / n for n in TOKENIZER_FILES if (Path(folder) / n).is_file()), None)


def load_tokenizer(path):
    """A SentencePiece model (tokenizer.model) or a tiktoken encoding named in a tokenizer.tiktoken file."""
    path = Path(path)
    if path.suffix == ".tiktoken":
        return TiktokenTokenizer(path.read_text().strip())
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer {path} not found")
    return Tokenizer(str(path))


class Tokenizer:
    """SentencePiece BPE with exact round trip; ids 1-5 are the reserved special tokens."""

    file_name = "tokenizer.model"

    def __init__(self, path=None, model_proto=None):
        try:
            self.sp = (
                spm.SentencePieceProcessor(model_file=path)
                if path
                else spm.SentencePieceProcessor(model_proto=model_proto)
            )
        except (RuntimeError, OSError) as e:  # SentencePiece's "could not parse ModelProto": a file handed over
            raise UserError(
                f"{path} is not a tokenizer ({str(e).split(':')[0]}); use a tokenizer.model of prepare.py"
            ) from None
        self.vocab_size = self.sp.vocab_size()
        self.special = {}
        for name in SPECIAL_TOKENS:
            i = self.sp.piece_to_id(name)
            if i == self.sp.unk_id():
                raise UserError(f"tokenizer {path or ''} has no special token {name}; re-run prepare.py to rebuild it")
            self.special[name] = i
        self.bos_id = self.special[BOS]
        self._meta_space_ids = [self.sp.piece_to_id(f"<0x{b:02X}>") for b in META_SPACE.encode()]

    def serialize(self):
        return self.sp.serialized_model_proto()

    def encode(self, text):
        ids = []
        for i, part in enumerate(text.split(META_SPACE)):
            if i:
                ids += self._meta_space_ids
            ids += self.sp.encode(part)
        return ids

    def encode_batch(self, texts, num_threads=0):
        """Encode many texts with SentencePiece's own threads (0 = all cores)."""
        plain = [t for t in texts if META_SPACE not in t]
        fast = iter(self.sp.encode(plain, num_threads=num_threads or runtime.cores()))
        return [next(fast) if META_SPACE not in t else self.encode(t) for t in texts]

    def decode(self, ids):
        return self.sp.decode([int(i) for i in ids])


class TiktokenTokenizer:
    """A tiktoken encoding (e.g. GPT-2's), with its <|endoftext|> as the document boundary. It has no chat
    tokens, so it serves pretraining only."""

    file_name = "tokenizer.tiktoken"

    def __init__(self, name):
        import tiktoken

        try:
            self.enc = tiktoken.get_encoding(name)
        except Exception as e:  # tiktoken downloads its files on first use and raises whatever the network does
            raise ValueError(
                f"tiktoken's {name!r} encoding is not available locally ({type(e).__name__}); run once with network "
                f"access or copy its files into TIKTOKEN_CACHE_DIR, or train a SentencePiece tokenizer instead"
            ) from None
        self.name = name
        self.vocab_size = self.enc.n_vocab
        self.bos_id = self.enc.eot_token
        self.special = {BOS: self.bos_id}

    def serialize(self):
        return self.name.encode() + b"\n"

    def encode(self, text):
        return self.enc.encode_ordinary(text)  # ordinary: "<|endoftext|>" in text stays text

    def encode_batch(self, texts, num_threads=0):
        return self.enc.encode_ordinary_batch(texts, num_threads=num_threads or runtime.cores())

    def decode(self, ids):
        return self.enc.decode([int(i) for i in ids if i != self.bos_id])
