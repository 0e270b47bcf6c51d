import hashlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diloco.data import (
    DatasetError,
    SourcePolicy,
    encode_documents,
    load_documents,
    sample_batch,
    shard_documents,
    split_documents,
)


def test_builtin_python_docs():
    from pydoc_data import topics

    docs = load_documents("builtin:python-docs")
    assert docs == [topics.topics[k] for k in sorted(topics.topics) if topics.topics[k].strip()]
    assert len(docs) > 20
    assert sum(len(d) for d in docs) > 100_000


def test_file_source_splits_on_blank_lines(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("first doc\nline two\n\nsecond\n\n\n\nthird")
    policy = SourcePolicy(data_root=str(tmp_path))
    assert load_documents(f"file:{path}", policy=policy) == ["first doc\nline two", "second", "third"]
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    assert len(load_documents(f"file:{path}", sha256=sha, policy=policy)) == 3
    with pytest.raises(DatasetError, match="sha256 mismatch"):
        load_documents(f"file:{path}", sha256="0" * 64, policy=policy)


@pytest.mark.parametrize(
    ("source", "sha", "message"),
    [
        ("file:relative/path.txt", None, "absolute"),
        ("file:/nonexistent/agora/corpus.txt", None, "no data root"),
        ("builtin:wikipedia", None, "unknown built-in"),
        ("ftp://example.org/x", None, "unsupported dataset source"),
        ("http://example.org/x", "a" * 64, "unsupported dataset source"),
        ("https://example.org/x", None, "pinned by its sha256"),
        ("https://example.org/x", "xyz", "64 hexadecimal"),
    ],
)
def test_bad_sources(source, sha, message):
    with pytest.raises(DatasetError, match=message):
        load_documents(source, sha256=sha)


def test_split_deterministic_disjoint_covering():
    docs = [f"doc {i}" for i in range(50)]
    train, held = split_documents(docs, 0.1, seed=0)
    assert (train, held) == split_documents(docs, 0.1, seed=0)
    assert len(held) == 5
    assert sorted(train + held) == sorted(docs)
    assert not set(train) & set(held)
    assert split_documents(docs, 0.1, seed=1)[1] != held
    assert len(split_documents(["a", "b"], 0.01)[1]) == 1
    assert split_documents(["a"], 0.5) == (["a"], [])
    assert split_documents(docs, 0.0) == (docs, [])
    with pytest.raises(ValueError):
        split_documents(docs, 1.0)


@settings(max_examples=60, deadline=None)
@given(
    docs=st.lists(st.text(min_size=1, max_size=40), max_size=40, unique=True),
    count=st.integers(min_value=1, max_value=8),
)
def test_shards_disjoint_covering_nonempty(docs, count):
    shards = [shard_documents(docs, i, count) for i in range(count)]
    flat = [d for s in shards for d in s]
    assert sorted(flat) == sorted(docs)  # covering and disjoint (docs are unique)
    if len(docs) >= count:
        assert all(shards)
    for s in shards:  # original order kept inside a shard
        assert s == [d for d in docs if d in set(s)]


def test_shards_balanced_by_bytes():
    docs = load_documents("builtin:python-docs")
    sizes = [sum(len(d.encode()) for d in shard_documents(docs, i, 4)) for i in range(4)]
    assert max(sizes) / min(sizes) < 1.05


def test_shard_bad_index():
    with pytest.raises(ValueError):
        shard_documents(["a"], 2, 2)
    with pytest.raises(ValueError):
        shard_documents(["a"], 0, 0)


def test_encode_and_sample_batch():
    tokens = encode_documents(["ab", "é"])
    assert tokens.tolist() == list(b"ab\n\n\xc3\xa9")
    assert tokens.dtype == torch.long
    assert encode_documents([]).numel() == 0
    corpus = torch.arange(100) % 256
    x, y = sample_batch(corpus, 4, 10, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 10)
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(y, x + 1)  # next-token targets
    x2, _ = sample_batch(corpus, 4, 10, torch.Generator().manual_seed(0))
    assert torch.equal(x, x2)
    with pytest.raises(DatasetError):
        sample_batch(torch.arange(5), 1, 10, torch.Generator())
