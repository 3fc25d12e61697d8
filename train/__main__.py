"""`python -m train --depth=N`: pretrain a GPT with the recipe derived from depth.

Multi-process: `torchrun --nproc_per_node=N -m train --depth=...` (multi-node with torchrun's own
rendezvous arguments).

Exit codes: 0 done; 2 a user mistake (a flag, a missing or mismatched file), reported in one line naming it;
1 a failure during training (a dead peer, a non-finite loss); 130 Ctrl-C, after saving the last completed step
(single process). TRITONCHAT_FAIL_AT="rank:step" makes that rank fail before that step (the failure tests).
"""

from __future__ import annotations

import os
import sys

from tritonchat.train.config import parse_args
from tritonchat.train.dist import destroy_distributed, env_dist_info
from tritonchat.train.loop import train


def _fail_at(rank: int) -> int | None:
    """The step TRITONCHAT_FAIL_AT="rank:step" names for this rank, or None."""
    spec = os.environ.get("TRITONCHAT_FAIL_AT", "")
    if not spec:
        return None
    try:
        fail_rank, step = (int(v) for v in spec.split(":"))
    except ValueError:
        raise ValueError(f"TRITONCHAT_FAIL_AT must be 'rank:step', got {spec!r}") from None
    return step if fail_rank == rank else None


def main(argv=None) -> int:
    cfg = parse_args(argv)
    info = env_dist_info()
    where = f" (rank {info.rank} of {info.world_size})" if info.enabled else ""
    try:
        train(cfg, fail_at=_fail_at(info.rank))
    except KeyboardInterrupt as e:
        print(str(e) or "interrupted", file=sys.stderr)
        return 130
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
