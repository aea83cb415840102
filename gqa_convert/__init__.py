"""gqa-convert: turn multi-head attention checkpoints into grouped-query attention and recover them."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("gqa-convert")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

from gqa_convert.errors import GQAConvertError

__all__ = ["GQAConvertError", "__version__"]
