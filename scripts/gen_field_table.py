"""Write docs/server.md's request-field table from server/fields.py (--check: exit 1 if the
file differs from what would be written)."""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from server.fields import replace_table  # noqa: E402

DOC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs", "server.md")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--doc", default=DOC)
    args = ap.parse_args()
    with open(args.doc) as f:
        doc = f.read()
    new = replace_table(doc)
    if args.check:
        if new != doc:
            print(f"{args.doc}: the field table is out of date; run scripts/gen_field_table.py")
            return 1
        return 0
    if new != doc:
        with open(args.doc, "w") as f:
            f.write(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
