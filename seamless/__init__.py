"""seamless: upgrade the Linux kernel of a running machine without losing its running programs."""

import time as _time

#: When this process's seamless began: the boot-time restorer tells its interpreter's
#: start apart from its imports with it.
STARTED = _time.time()

# Written here, not read from the installed metadata: importlib.metadata scans every
# installed distribution, which took a second of the restorer's start under TCG.
# pyproject.toml reads it from here.
__version__ = "0.1.0"
