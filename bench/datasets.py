"""Preparing a run's data once on the server: BPE training, tokenization and shards, against the bytes path.

    python -m bench.datasets [--quick] [--vocab 4096] [--workers 4 8]

Corpus: the built-in ``builtin:python-docs`` (465 kB of text, 90 % train). Baseline measured in the same
run: the byte tokenizer (what ``byte-gpt`` reads), whose tokens are the UTF-8 bytes. For each tokenizer:
the median seconds to train it on the training split and to tokenize and write every shard, the tokens
per byte (fewer tokens = longer context per token and fewer steps per epoch), and for k workers the
median shard an agent downloads against the whole corpus it read before (protocol v1).
"""

from __future__ import annotations

import argparse
import statistics
import time

from bench.common import fmt_bytes, print_table
from diloco.data import (
    encode_token_shard,
    load_documents,
    read_token_shard,
    shard_assignment,
    split_documents,
)
from diloco.tokenization import load_tokenizer, train_bpe


def _median(fn, repeat: int):
    times, out = [], None
    for _ in range(repeat):
        started = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times), out


def _shards(train: list[str], tokenizer, count: int) -> list[bytes]:
    owner = shard_assignment(train, count)
    return [encode_token_shard([d for d, s in zip(train, owner, strict=True) if s == i], tokenizer)
            for i in range(count)]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="one repeat, a smaller vocabulary, k=4 only")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--workers", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    repeat = 1 if args.quick else args.repeat
    vocabs = [1024] if args.quick else sorted({1024, args.vocab})
    workers = [4] if args.quick else args.workers
    docs = load_documents("builtin:python-docs")
    train, heldout = split_documents(docs, 0.1)
    corpus_bytes = len("\n\n".join(docs).encode())
    train_bytes = sum(len(d.encode()) for d in train)
    print(f"builtin:python-docs: {len(docs)} documents, {fmt_bytes(corpus_bytes)}; train split {len(train)} "
          f"documents, {fmt_bytes(train_bytes)}", flush=True)

    tokenizers = [("byte (baseline)", 0.0, load_tokenizer(None))]
    for vocab in vocabs:
        seconds, data = _median(lambda v=vocab: train_bpe(train, v), repeat)
        tokenizers.append((f"bpe {vocab}", seconds, load_tokenizer(data)))

    rows = []
    for name, train_s, tok in tokenizers:
        for k in workers:
            shard_s, shards = _median(lambda t=tok, k=k: _shards(train, t, k), repeat)
            parsed = [read_token_shard(s) for s in shards]
            tokens = sum(int(p.tokens.numel()) for p in parsed)
            sizes = [len(s) for s in shards]
            rows.append([name, k, f"{train_s:.2f}", f"{shard_s:.2f}", f"{tokens / train_bytes:.3f}",
                         fmt_bytes(statistics.median(sizes)), fmt_bytes(corpus_bytes),
                         f"{statistics.median(sizes) / corpus_bytes:.3f}"])
    print_table(["tokenizer", "k", "train s", "tokenize+shards s", "tokens/byte", "median shard",
                 "v1 download", "shard / v1"], rows,
                title="Preparing python-docs once on the server (medians; baseline: byte tokenizer, v1 = whole corpus)")


if __name__ == "__main__":
    main()
