"""memfs: a user-space compressed-memory pager with a FUSE control filesystem."""
__version__ = "0.2.0"

from .protocol import VERSION as PROTOCOL_VERSION  # noqa: E402,F401
