"""regap: measure and close the modality gap that makes vision-language models unsafe."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("regap")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"

from regap.errors import RegapError

__all__ = ["RegapError", "__version__"]
