"""`python -m train --depth=N`: pretrain a GPT with the recipe derived from depth.

Multi-process: `torchrun --nproc_per_node=N -m train --depth=...` (multi-node with torchrun's own
rendezvous arguments).
"""

from __future__ import annotations

import sys

from train.config import parse_args
from train.dist import destroy_distributed, env_dist_info
from train.loop import train


def main(argv=None) -> int:
    cfg = parse_args(argv)
    info = env_dist_info()
    where = f" (rank {info.rank} of {info.world_size})" if info.enabled else ""
    try:
        train(cfg)
    except (FileNotFoundError, ValueError) as e:
        print(f"error{where}: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # a failed collective, a dead peer, an injected fault, ...
        print(f"error{where}: training failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
