"""Standalone verifier for an exported ledger (no Django needed).

    python -m ledger.verify ledger.json [--head SEQ:HASH]

The file is the JSON export (``manage.py export_ledger``, or the pages of ``GET /api/v1/ledger/``
joined): either a list of entries or an object with an ``entries`` list and the ``head`` recorded
when it was exported. Every broken entry is printed with its seq and what is wrong (hash mismatch,
broken link, seq gap). ``--head`` is a head you obtained yourself (``GET /api/v1/ledger/head``, or
one published elsewhere); without it the export's own head is used, which proves the export is
complete only as far as you trust the file. Exit status 0 when the chain holds, 1 when it is broken
or shorter than the head, 2 when the file cannot be read.
"""

from __future__ import annotations

import argparse
import json
import sys

from ledger.chain import PublishedHead, verify


def _head_arg(text: str) -> PublishedHead:
    try:
        return PublishedHead.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ledger.verify", description=__doc__.splitlines()[0])
    parser.add_argument("path", help="exported ledger JSON, or - for standard input")
    parser.add_argument("--head", type=_head_arg, metavar="SEQ:HASH",
                        help="the published head the export must reach (default: the head recorded in the export)")
    args = parser.parse_args(argv)
    try:
        if args.path == "-":
            data = json.load(sys.stdin)
        else:
            with open(args.path, encoding="utf-8") as fh:
                data = json.load(fh)
    except (OSError, ValueError, RecursionError) as exc:
        print(f"cannot read {args.path}: {exc}", file=sys.stderr)
        return 2
    entries = data.get("entries") if isinstance(data, dict) else data
    if not isinstance(entries, list):
        print(f"cannot read {args.path}: expected a list of entries or an object with an 'entries' list",
              file=sys.stderr)
        return 2
    heads = []
    if args.head is not None:
        heads.append(args.head)
    elif isinstance(data, dict) and data.get("head") is not None:
        try:
            heads.append(PublishedHead.from_mapping(data["head"]))
        except ValueError as exc:
            print(f"cannot read the export's head: {exc}", file=sys.stderr)
            return 2
        print(f"checking against the head recorded in the export ({heads[0]}); "
              "pass --head SEQ:HASH from GET /api/v1/ledger/head to check against the live one")
    verdict = verify(entries, heads=heads)
    print(verdict)
    return 0 if verdict.ok else 1


if __name__ == "__main__":
    sys.exit(main())
