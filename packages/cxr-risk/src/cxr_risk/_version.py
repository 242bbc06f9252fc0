"""The installed distribution's version, in a module of its own so that modules can record it without
importing the package ``__init__`` (which would put the whole data layer above them)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__: str = version("cxr-risk")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0.0.0+unknown"
