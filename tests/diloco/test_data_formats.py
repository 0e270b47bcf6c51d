"""Dataset formats (text, JSONL with a field, Parquet with a column) and pre-tokenized shards."""

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import save as st_save

from diloco.data import (
    DatasetError,
    ShardError,
    SourcePolicy,
    bits_per_byte,
    encode_documents,
    encode_token_shard,
    load_dataset,
    load_documents,
    parse_documents,
    read_token_shard,
    sample_batch,
    shard_filtered_tokens,
    write_token_shard,
)
from diloco.tokenization import load_tokenizer, train_bpe

DOCS = ["first document, with words", "second: ünïcode 🙂", "third\nhas two lines", "fourth and last"]


def jsonl(rows) -> bytes:
    return "\n".join(json.dumps(r) for r in rows).encode()


def parquet(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


# --- formats -----------------------------------------------------------------------------------


def test_jsonl_reads_the_named_field_and_skips_blank_lines():
    raw = jsonl([{"text": d, "id": i} for i, d in enumerate(DOCS)]) + b"\n\n" + jsonl([{"text": "  "}])
    assert parse_documents(raw, format="jsonl", field="text") == DOCS


@pytest.mark.parametrize(("raw", "message"), [
    (b'{"text": "a"}\n{"body": "b"}', "line 2: no field 'text'"),
    (b'{"text": "a"}\n\n{"text": 3}', "line 3: field 'text' is int, not a string"),
    (b'{"text": "a"}\n[1, 2]', "line 2: expected a JSON object, got list"),
    (b'{"text": "a"}\n{"text": "b"', "line 2: not valid JSON"),
    (b'{"text": NaN}', "line 1"),
    (b'{"text": "a", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}", "line 1"),
])
def test_jsonl_errors_name_the_line_and_field(raw, message):
    with pytest.raises(DatasetError, match=message.replace("[", r"\[")):
        parse_documents(raw, format="jsonl", field="text", source="file:/data/x.jsonl")


def test_jsonl_needs_a_field():
    with pytest.raises(DatasetError, match="needs the name of its text field"):
        parse_documents(b'{"text": "a"}', format="jsonl", field=None)


def test_parquet_reads_the_named_column_and_skips_nulls():
    table = pa.table({"text": DOCS[:2] + [None, ""] + DOCS[2:], "n": [1, 2, 3, 4, 5, 6]})
    assert parse_documents(parquet(table), format="parquet", field="text") == DOCS


def test_parquet_errors_name_the_column():
    raw = parquet(pa.table({"body": DOCS, "n": [1, 2, 3, 4]}))
    with pytest.raises(DatasetError, match="no column 'text' \\(columns: body, n\\)"):
        parse_documents(raw, format="parquet", field="text")
    with pytest.raises(DatasetError, match="column 'n' holds int64, not strings"):
        parse_documents(raw, format="parquet", field="n")
    with pytest.raises(DatasetError, match="not a readable parquet file"):
        parse_documents(b"PAR1 this is not parquet PAR1", format="parquet", field="text")


def test_parquet_that_would_inflate_past_the_limit_is_refused():
    raw = parquet(pa.table({"text": ["a" * 10_000] * 50}))  # compresses to far less than it holds
    with pytest.raises(DatasetError, match="decompresses to"):
        parse_documents(raw, format="parquet", field="text", max_bytes=len(raw) // 8 + 1000)


def test_file_sources_in_each_format_go_through_the_source_policy(tmp_path):
    (tmp_path / "d.jsonl").write_bytes(jsonl([{"t": d} for d in DOCS]))
    (tmp_path / "d.parquet").write_bytes(parquet(pa.table({"t": DOCS})))
    policy = SourcePolicy(data_root=str(tmp_path))
    docs, sha = load_dataset(f"file:{tmp_path}/d.jsonl", policy=policy, format="jsonl", field="t")
    assert docs == DOCS and len(sha) == 64
    assert load_documents(f"file:{tmp_path}/d.parquet", policy=policy, format="parquet", field="t") == DOCS
    with pytest.raises(DatasetError, match="no data root"):
        load_documents(f"file:{tmp_path}/d.jsonl", format="jsonl", field="t")
    with pytest.raises(DatasetError, match="cannot be read as jsonl"):
        load_documents("builtin:python-docs", format="jsonl", field="t")
    with pytest.raises(DatasetError, match="unknown format"):
        load_documents(f"file:{tmp_path}/d.jsonl", policy=policy, format="csv")


# --- shards ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bpe():
    return load_tokenizer(train_bpe(DOCS * 5, 300))


def test_byte_shards_hold_exactly_todays_byte_tokens():
    data = encode_token_shard(DOCS, load_tokenizer(None), meta={"split": "train"})
    shard = read_token_shard(data, vocab_size=256, tokenizer="byte")
    assert torch.equal(shard.tokens, encode_documents(DOCS))
    assert shard.documents == 4 and shard.meta["split"] == "train"
    assert shard.nbytes == sum(len(d.encode()) for d in DOCS)
    assert bytes(shard.document(1).tolist()).decode() == DOCS[1]


def test_bpe_shards_round_trip_and_are_content_addressed(bpe):
    data = encode_token_shard(DOCS, bpe)
    assert data == encode_token_shard(list(DOCS), bpe)
    shard = read_token_shard(data, vocab_size=bpe.vocab_size, tokenizer=bpe.sha256)
    assert [bpe.decode(shard.document(i).tolist()) for i in range(4)] == DOCS
    assert int((shard.tokens == bpe.eos_id).sum()) == 3  # one separator between documents
    assert shard.tokens.dtype == torch.int64
    x, y = sample_batch(shard.tokens, 2, 4, torch.Generator().manual_seed(0))
    assert x.shape == (2, 4) and torch.equal(x[:, 1:], y[:, :-1])


def test_ids_are_stored_in_the_narrowest_dtype():
    sizes = {}
    for vocab in (256, 65_536, 100_000):
        ids = [0, vocab - 1, 5] * 100
        data = write_token_shard(ids, doc_starts=[0], doc_lengths=[300], vocab_size=vocab, tokenizer="f" * 64,
                                 nbytes=9)
        assert read_token_shard(data).tokens.tolist() == ids
        sizes[vocab] = len(data)
    assert sizes[256] < sizes[65_536] < sizes[100_000]


def test_expected_vocabulary_and_tokenizer_are_checked(bpe):
    data = encode_token_shard(DOCS, bpe)
    with pytest.raises(ShardError, match="vocabulary of"):
        read_token_shard(data, vocab_size=256)
    with pytest.raises(ShardError, match="made with tokenizer"):
        read_token_shard(data, tokenizer="byte")


def _forged(tensors: dict, meta: dict | None = None) -> bytes:
    base = {"format": "agora-token-shard/1", "vocab_size": 256, "tokenizer": "byte", "documents": 1,
            "bytes": 3, "tokens": 3}
    return st_save(tensors, metadata={"agora": json.dumps({**base, **(meta or {})})})


GOOD = {"tokens": torch.tensor([1, 2, 3], dtype=torch.uint8), "doc_starts": torch.tensor([0]),
        "doc_lengths": torch.tensor([3])}


@pytest.mark.parametrize(("data", "message"), [
    (b"", "too short"),
    (b"\xff" * 16, "header length"),
    ((20).to_bytes(8, "little") + b"{not json at all....", "not JSON"),
    (_forged({**GOOD, "tokens": torch.tensor([1, 2, 300], dtype=torch.uint16)}, {"vocab_size": 256}), "dtype U8"),
    (_forged({**GOOD, "tokens": torch.tensor([1, 2, 300], dtype=torch.uint16)}, {"vocab_size": 290}),
     "token id 300 is outside"),
    (_forged({**GOOD, "tokens": torch.tensor([1, 2, 3], dtype=torch.int32)}), "dtype U8"),
    (_forged({**GOOD, "tokens": torch.tensor([1.0, 2.0, 3.0])}), "dtype U8 or U16 or I32"),
    (_forged({**GOOD, "tokens": torch.tensor([[1, 2, 3]], dtype=torch.uint8)}), "1-D"),
    (_forged({**GOOD, "extra": torch.tensor([1])}), "holds tensors"),
    (_forged({**GOOD, "doc_lengths": torch.tensor([4])}), "outside the shard's tokens"),
    (_forged({**GOOD, "doc_starts": torch.tensor([0, 1]), "doc_lengths": torch.tensor([2, 2])},
             {"documents": 2}), "overlap"),
    (_forged(GOOD, {"tokens": 4}), "does not match its tensors"),
    (_forged(GOOD, {"format": "other"}), "format"),
    (_forged(GOOD, {"bytes": -1}), "bytes must be"),
    (st_save(GOOD), "no agora metadata"),
])
def test_hostile_shards_are_refused_with_a_reason(data, message):
    with pytest.raises(ShardError, match=message):
        read_token_shard(data)


def test_a_shard_over_the_size_limit_is_refused():
    with pytest.raises(ShardError, match="over the limit"):
        read_token_shard(_forged(GOOD), max_bytes=10)


def test_guardrails_enacted_after_the_shard_still_drop_documents(bpe):
    shard = read_token_shard(encode_token_shard(DOCS, bpe))
    guard = [{"id": 7, "kind": "data_filter", "patterns": ["second|fourth"]}]
    tokens, dropped = shard_filtered_tokens(shard, bpe, guard)
    assert dropped == 2
    assert bpe.decode(tokens.tolist()) == DOCS[0] + "<|endoftext|>" + DOCS[2]
    assert shard_filtered_tokens(shard, bpe, [])[0] is shard.tokens


def test_bits_per_byte_converts_nats_per_token():
    assert bits_per_byte(0.6931471805599453, tokens=100, nbytes=100) == pytest.approx(1.0)
    assert bits_per_byte(0.6931471805599453, tokens=100, nbytes=400) == pytest.approx(0.25)
    assert bits_per_byte(float("nan"), tokens=1, nbytes=1) is None
