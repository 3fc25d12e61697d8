"""Where tritonchat keeps its data, tokenizer and checkpoints."""

import os


def get_base_dir() -> str:
    """The base directory: $TRITONCHAT_BASE_DIR if set, else ~/.cache/tritonchat.

    The environment is read on every call (never at import), and nothing is created on disk.
    """
    base = os.environ.get("TRITONCHAT_BASE_DIR")
    if base:
        return os.path.abspath(os.path.expanduser(base))
    return os.path.join(os.path.expanduser("~"), ".cache", "tritonchat")
