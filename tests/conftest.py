"""Host tests: nothing here freezes a process, loads a kernel or touches reserved RAM."""

from __future__ import annotations

import sys
from pathlib import Path

# The test bed's own code (vm-tests/vmtest) is tested on the host too.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "vm-tests"))
