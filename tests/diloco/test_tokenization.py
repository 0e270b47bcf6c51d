"""Tokenizers: a trained byte-level BPE is deterministic and lossless; imported tokenizer.json files are checked."""

import json

import pytest

from diloco.tokenization import (
    MAX_BPE_VOCAB,
    ByteTokenizer,
    TokenizerError,
    load_tokenizer,
    tokenizer_sha256,
    train_bpe,
)

CORPUS = [f"def function_{i}(x):\n    return x * {i} + {i % 7}  # the answer" for i in range(60)] + [
    "Ünïcödé text, emoji 🙂 and\ttabs survive a round trip.",
    "The quick brown fox jumps over the lazy dog. " * 5,
]


@pytest.fixture(scope="module")
def bpe_json() -> bytes:
    return train_bpe(CORPUS, 400)


def test_training_is_deterministic(bpe_json):
    again = train_bpe(list(CORPUS), 400)
    assert again == bpe_json
    assert tokenizer_sha256(again) == tokenizer_sha256(bpe_json)
    assert train_bpe(CORPUS, 320) != bpe_json  # the vocabulary size is part of what is trained


def test_bpe_round_trips_any_text_and_compresses(bpe_json):
    tok = load_tokenizer(bpe_json)
    assert tok.kind == "bpe" and tok.sha256 == tokenizer_sha256(bpe_json)
    assert 300 < tok.vocab_size <= 400
    for text in CORPUS + ["never seen: ÆØÅ ∑ 中文 \x00 \r\n", ""]:
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text
    sample = CORPUS[3]
    assert len(tok.encode(sample)) < len(sample.encode("utf-8")) / 2  # merges learned from the corpus
    assert tok.separator == [tok.eos_id]
    assert tok.decode([tok.eos_id]) == "<|endoftext|>"


def test_none_is_the_byte_tokenizer():
    tok = load_tokenizer(None)
    assert isinstance(tok, ByteTokenizer) and tok.vocab_size == 256 and tok.sha256 is None
    assert tok.encode("é!") == [0xC3, 0xA9, 0x21]
    assert tok.decode(tok.encode("héllo")) == "héllo"
    assert tokenizer_sha256(None) is None


@pytest.mark.parametrize("vocab", [0, 100, 259, MAX_BPE_VOCAB + 1, 1.5, True])
def test_training_refuses_a_vocabulary_out_of_bounds(vocab):
    with pytest.raises(TokenizerError, match="vocab_size"):
        train_bpe(CORPUS, vocab)


def test_training_refuses_no_text():
    with pytest.raises(TokenizerError, match="no text"):
        train_bpe(["", "  \n"], 400)


@pytest.mark.parametrize(("data", "message"), [
    (b"\xff\xfe not utf-8", "not UTF-8"),
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "\"model\" section"),
    (b'{"model": {"type": "Nonsense"}}', "unknown model type"),
    (b'{"model": {"type": "BPE", "vocab": "x"}}', "cannot be loaded"),
    (b"[" * 100_000, "not valid JSON"),
])
def test_hostile_tokenizer_files_are_refused_with_a_reason(data, message):
    with pytest.raises(TokenizerError, match=message):
        load_tokenizer(data)


def test_a_tokenizer_without_an_end_of_text_token_is_refused(bpe_json):
    spec = json.loads(bpe_json)
    spec["added_tokens"] = []
    spec["model"]["vocab"] = {k: v for k, v in spec["model"]["vocab"].items() if k != "<|endoftext|>"}
    with pytest.raises(TokenizerError, match="no end-of-text token"):
        load_tokenizer(json.dumps(spec).encode())


def test_vocabulary_bounds_apply_to_imported_tokenizers(bpe_json):
    with pytest.raises(TokenizerError, match="over the limit of 300"):
        load_tokenizer(bpe_json, max_vocab=300)
    tiny = json.loads(bpe_json)
    keep = {k: v for k, v in tiny["model"]["vocab"].items() if v < 100}
    tiny["model"]["vocab"], tiny["model"]["merges"] = keep, []
    tiny["added_tokens"] = [t for t in tiny["added_tokens"] if t["id"] < 100]
    with pytest.raises(TokenizerError, match="at least 256"):
        load_tokenizer(json.dumps(tiny).encode())
