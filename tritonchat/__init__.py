"""tritonchat: train, tune and serve a nanochat-style GPT on hand-written Triton kernels.

The subpackages are `tritonchat.kernels`, `tritonchat.engine`, `tritonchat.train`, `tritonchat.tasks`,
`tritonchat.scripts` and `tritonchat.bench`. An installed wheel holds them in this folder. In a checkout they are
the top-level folders kernels/, engine/, train/, tasks/, scripts/ and bench/ beside this one, which is why the
checkout's root joins this package's search path below (nothing else happens at import).
"""

from pathlib import Path as _Path

_root = _Path(__file__).resolve().parent.parent
if not (_Path(__file__).resolve().parent / "kernels").is_dir() and (_root / "kernels" / "_dispatch.py").is_file():
    __path__.append(str(_root))  # noqa: F821 - the package's own search path
del _Path, _root

__version__ = "0.1.0"
