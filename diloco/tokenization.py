"""Tokenizers: the byte-level one (ids 0–255, what ``byte-gpt`` reads) and Hugging Face ``tokenizers`` ones.

Both answer the same small interface (:class:`Tokenizer`): ``encode(text) -> list[int]``, ``decode(ids)``,
``vocab_size``, ``eos_id`` and ``separator``, the ids placed between two documents of a token stream.

- :func:`train_bpe` trains a byte-level BPE (GPT-2 style: any UTF-8 text round-trips, no unknown token)
  on a list of documents and returns its ``tokenizer.json`` bytes. Training is deterministic: the same
  documents, vocabulary size and special tokens give the same bytes, hence the same sha256.
- :func:`load_tokenizer` reads ``tokenizer.json`` bytes (``None`` is the byte tokenizer). The bytes may come
  from anyone who can import a model, so they are checked before use: size, JSON, a model the library
  can build, a vocabulary within bounds and an end-of-text token to separate documents. Every refusal is
  a :class:`TokenizerError` saying what is wrong.

Tokenizers are content addressed by :func:`tokenizer_sha256` (sha256 of the ``tokenizer.json`` bytes).
"""

from __future__ import annotations

import hashlib
import json
from typing import Protocol

BYTE_VOCAB_SIZE = 256
# A trained BPE keeps the 256 byte symbols; the bounds of the spec's ``tokenizer.vocab_size``.
MIN_BPE_VOCAB = 260
MAX_BPE_VOCAB = 65_536
# An imported tokenizer (Llama 3 has 128 256 ids, Gemma 256 000).
MAX_IMPORTED_VOCAB = 262_144
MAX_TOKENIZER_BYTES = 64 * 1024**2
DEFAULT_SPECIAL_TOKENS = ("<|endoftext|>",)
# Names an end-of-text token goes by, in the order they are looked for.
EOS_NAMES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "[SEP]")


class TokenizerError(ValueError):
    """A tokenizer cannot be trained or loaded: malformed ``tokenizer.json``, vocabulary out of bounds, ..."""


class Tokenizer(Protocol):
    kind: str  # "byte" or "bpe"
    vocab_size: int
    eos_id: int | None
    sha256: str | None  # None for the byte tokenizer

    @property
    def separator(self) -> list[int]: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as ids. Documents are separated by a blank line, as ``diloco.data.encode_documents`` does."""

    kind = "byte"
    vocab_size = BYTE_VOCAB_SIZE
    eos_id = None
    sha256 = None

    @property
    def separator(self) -> list[int]:
        return [10, 10]

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class HFTokenizer:
    """A Hugging Face ``tokenizers.Tokenizer`` behind the common interface (no special tokens are added)."""

    kind = "bpe"

    def __init__(self, tokenizer, *, sha256: str, vocab_size: int, eos_id: int):
        self._tok = tokenizer
        self.sha256 = sha256
        self.vocab_size = vocab_size
        self.eos_id = eos_id

    @property
    def separator(self) -> list[int]:
        return [self.eos_id]

    @property
    def backend(self):
        """The ``tokenizers.Tokenizer`` (for callers that need more than the common interface)."""
        return self._tok

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def __repr__(self) -> str:
        return f"HFTokenizer(vocab_size={self.vocab_size}, sha256={self.sha256[:12]}…)"


def tokenizer_sha256(data: bytes | None) -> str | None:
    """The content address of a ``tokenizer.json`` (None for the byte tokenizer)."""
    return None if data is None else hashlib.sha256(data).hexdigest()


def train_bpe(texts: list[str], vocab_size: int, *,
              special_tokens: tuple[str, ...] | list[str] = DEFAULT_SPECIAL_TOKENS) -> bytes:
    """A byte-level BPE trained on ``texts``, as ``tokenizer.json`` bytes; the first special token ends a text.

    The vocabulary holds the special tokens, the 256 byte symbols and up to ``vocab_size`` minus those
    merges (fewer when the texts have no more pairs worth merging). Deterministic for the same input.
    """
    from tokenizers import Tokenizer as HFBackend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise TokenizerError(f"vocab_size must be an integer, not {vocab_size!r}")
    if not MIN_BPE_VOCAB <= vocab_size <= MAX_BPE_VOCAB:
        raise TokenizerError(f"vocab_size must be between {MIN_BPE_VOCAB} and {MAX_BPE_VOCAB}, not {vocab_size}")
    special_tokens = list(special_tokens)
    if not special_tokens or not all(isinstance(s, str) and s for s in special_tokens):
        raise TokenizerError("special_tokens must be non-empty strings; the first one separates documents")
    if not any(t.strip() for t in texts):
        raise TokenizerError("cannot train a tokenizer on no text")
    tok = HFBackend(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2)
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    # Canonical bytes: parse and dump with sorted keys, so the hash names the tokenizer, not the dumper.
    return json.dumps(json.loads(tok.to_str()), sort_keys=True, ensure_ascii=False,
                      separators=(",", ":")).encode("utf-8")


def _find_eos(backend, vocab: dict[str, int]) -> int | None:
    for name in EOS_NAMES:
        if name in vocab:
            return vocab[name]
    return None


def load_tokenizer(data: bytes | None, *, max_vocab: int = MAX_IMPORTED_VOCAB) -> ByteTokenizer | HFTokenizer:
    """The tokenizer in ``tokenizer.json`` bytes, checked; ``None`` gives the byte tokenizer."""
    if data is None:
        return ByteTokenizer()
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TokenizerError(f"tokenizer.json must be bytes, not {type(data).__name__}")
    data = bytes(data)
    if len(data) > MAX_TOKENIZER_BYTES:
        raise TokenizerError(f"tokenizer.json has {len(data)} bytes, over the limit of {MAX_TOKENIZER_BYTES}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TokenizerError(f"tokenizer.json is not UTF-8 text: {exc}") from None
    try:
        parsed = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise TokenizerError(f"tokenizer.json is not valid JSON: {exc}") from None
    if not isinstance(parsed, dict) or not isinstance(parsed.get("model"), dict):
        raise TokenizerError("tokenizer.json must be an object with a \"model\" section")
    model_type = parsed["model"].get("type")
    if model_type is not None and model_type not in ("BPE", "Unigram", "WordPiece", "WordLevel"):
        raise TokenizerError(f"tokenizer.json has an unknown model type {model_type!r}")
    from tokenizers import Tokenizer as HFBackend

    try:
        backend = HFBackend.from_str(text)
    except Exception as exc:  # the library raises plain Exception subclasses for every parse problem
        raise TokenizerError(f"tokenizer.json cannot be loaded: {exc}") from None
    vocab = backend.get_vocab(with_added_tokens=True)
    if not vocab:
        raise TokenizerError("tokenizer.json has an empty vocabulary")
    vocab_size = max(vocab.values()) + 1
    if vocab_size > max_vocab:
        raise TokenizerError(f"tokenizer.json has {vocab_size} ids, over the limit of {max_vocab}")
    if vocab_size < BYTE_VOCAB_SIZE:
        raise TokenizerError(f"tokenizer.json has only {vocab_size} ids; at least {BYTE_VOCAB_SIZE} are needed")
    eos = _find_eos(backend, vocab)
    if eos is None:
        raise TokenizerError("tokenizer.json has no end-of-text token to separate documents (looked for "
                             + ", ".join(EOS_NAMES) + ")")
    return HFTokenizer(backend, sha256=hashlib.sha256(data).hexdigest(), vocab_size=vocab_size, eos_id=eos)


def encode_texts(tokenizer, texts: list[str]) -> list[list[int]]:
    """Each text's ids (batched when the tokenizer can)."""
    batch = getattr(tokenizer, "encode_batch", None)
    return batch(texts) if batch is not None else [tokenizer.encode(t) for t in texts]
