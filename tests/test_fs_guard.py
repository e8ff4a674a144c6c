"""A bug in a handler becomes EIO; it never takes the mount down."""
import errno

import pyfuse3
import pytest

from memfs.fs.operations import Operations
from memfs.fs.tree import Tree
from memfs.fs.view import DaemonView


class BrokenTree(Tree):
    def attributes(self, key):
        raise RuntimeError("a bug")


async def test_unexpected_exception_becomes_eio(daemon, caplog):
    ops = Operations(BrokenTree(DaemonView(daemon)))
    with pytest.raises(pyfuse3.FUSEError) as e:
        await ops.getattr(pyfuse3.ROOT_INODE, None)
    assert e.value.errno == errno.EIO
    assert "a bug" in caplog.text


async def test_oserror_keeps_its_errno(daemon):
    ops = Operations(Tree(DaemonView(daemon)))
    with pytest.raises(pyfuse3.FUSEError) as e:
        await ops.lookup(pyfuse3.ROOT_INODE, b"no-such-file", None)
    assert e.value.errno == errno.ENOENT
