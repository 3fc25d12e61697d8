"""`python -m train --depth=N`: pretrain a GPT with the recipe derived from depth."""

from __future__ import annotations

import sys

from train.config import parse_args
from train.loop import train


def main(argv=None) -> int:
    cfg = parse_args(argv)
    try:
        train(cfg)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
