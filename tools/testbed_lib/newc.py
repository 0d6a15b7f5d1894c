"""The newc cpio writer of the testbed: kvmits.newc, the one definition, shared with
kvmits.lab.linux_guest.

tools/testbed runs on the host's python3, where kvmits need not be installed: the source tree
this tool belongs to goes first on sys.path so that `kvmits.newc` is this tree's (kvmits'
__init__ imports nothing, so this loads no cffi or other dependency).
"""

import sys

from .paths import SOURCE_ROOT

if str(SOURCE_ROOT) not in sys.path:
    sys.path.insert(0, str(SOURCE_ROOT))

from kvmits.newc import BLOCK, MAGIC, TRAILER, NewcWriter, parent_dirs  # noqa: E402

__all__ = ["BLOCK", "MAGIC", "TRAILER", "NewcWriter", "parent_dirs"]
