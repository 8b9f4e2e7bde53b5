"""seamless: upgrade the Linux kernel of a running machine without losing its running programs."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("seamless")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+source"
