"""memfs: a user-space compressed-memory pager with a FUSE control filesystem."""
__version__ = "0.1.0"
PROTOCOL_VERSION = 1
