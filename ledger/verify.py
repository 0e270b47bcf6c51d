"""Standalone verifier for an exported ledger (no Django needed).

    python -m ledger.verify ledger.json

The file is the JSON export (``manage.py export_ledger`` or the pages of ``GET /api/v1/ledger/``):
either a list of entries or an object with an ``entries`` list. Exit status 0 when the chain holds,
1 with the first broken seq otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys

from ledger.chain import verify


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ledger.verify", description=__doc__.splitlines()[0])
    parser.add_argument("path", help="exported ledger JSON, or - for standard input")
    args = parser.parse_args(argv)
    try:
        if args.path == "-":
            data = json.load(sys.stdin)
        else:
            with open(args.path, encoding="utf-8") as fh:
                data = json.load(fh)
    except (OSError, json.JSONDecodeError) as exc:
        print(f"cannot read {args.path}: {exc}", file=sys.stderr)
        return 2
    entries = data["entries"] if isinstance(data, dict) else data
    verdict = verify(entries)
    print(verdict)
    return 0 if verdict.ok else 1


if __name__ == "__main__":
    sys.exit(main())
