"""Tests of tools/testbed's pure logic: no qemu, no network, no root; milliseconds each.

The tool is a script plus the package tools/testbed_lib, which is imported from tools/.
"""

import sys
from pathlib import Path

TOOLS = Path(__file__).resolve().parents[2] / "tools"
if str(TOOLS) not in sys.path:
    sys.path.insert(0, str(TOOLS))
