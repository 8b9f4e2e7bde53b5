#!/usr/bin/python
# Copyright: seamless developers; GNU General Public License v2.0 only
from __future__ import annotations

DOCUMENTATION = r"""
module: seamless_preflight
short_description: Check that a host can be upgraded with seamless, and choose its kernel
description:
  - Runs C(seamless plan --json), C(seamless kernel-check RELEASE --json) and
    C(seamless store status --json) on the host; changes nothing.
  - Chooses the kernel to move to, a path or release given, or the newest installed one.
  - Fails, with every reason, when the upgrade would be refused.
options:
  kernel:
    description: The kernel to move to (/boot/vmlinuz-RELEASE or RELEASE); the newest
      installed one when unset.
    type: str
  seamless:
    description: The seamless command.
    type: str
    default: seamless
  boot:
    description: Where the kernels are installed.
    type: path
    default: /boot
author: seamless developers
"""

RETURN = r"""
kernel: {description: the kernel image path, type: str, returned: always}
release: {description: its release, type: str, returned: always}
running: {description: the release the host runs now, type: str, returned: always}
up_to_date: {description: the host runs that kernel already (or, the kernel unset, a newer
  one than any installed), type: bool, returned: always}
trees: {description: how many process trees would be carried, type: int, returned: always}
memory: {description: their memory in bytes, type: int, returned: always}
problems: {description: why the upgrade would be refused, type: list, returned: always}
"""

import glob  # noqa: E402
import os  # noqa: E402

from ansible.module_utils.basic import AnsibleModule  # noqa: E402
from ansible_collections.seamless.kernel.plugins.module_utils.seamless import (  # noqa: E402
    choose_kernel,
    preflight_problems,
    release_key,
)


def main():
    module = AnsibleModule(
        argument_spec={"kernel": {"type": "str"},
                       "seamless": {"type": "str", "default": "seamless"},
                       "boot": {"type": "path", "default": "/boot"}},
        supports_check_mode=True,
    )
    seamless = module.params["seamless"]
    running = os.uname().release
    boot = module.params["boot"].rstrip("/")
    installed = ["/boot/" + os.path.basename(p) for p in glob.glob(boot + "/vmlinuz-*")]
    path, release, error = choose_kernel(module.params["kernel"], installed)
    if path:
        path = boot + path[len("/boot"):]
    if error:
        module.fail_json(msg=error, problems=[error])
    plan = module.run_command([seamless, "plan", "--json"])
    check = module.run_command([seamless, "kernel-check", release, "--json"])
    store = module.run_command([seamless, "store", "status", "--json"])
    try:
        problems, planned = preflight_problems(plan[0], plan[1], check[0], check[1],
                                               store[0], store[1])
    except ValueError as e:
        module.fail_json(msg=str(e))
    result = {
        "changed": False, "kernel": path, "release": release, "running": running,
        # unset: the newest installed, and nothing newer than what runs is no upgrade
        "up_to_date": release == running or (not module.params["kernel"] and
                                             release_key(release) < release_key(running)),
        "trees": len(planned.get("trees", [])),
        "memory": planned.get("memory", 0), "problems": problems,
    }
    if problems and release != running:
        module.fail_json(msg="{} cannot be upgraded to {}: {}".format(
            os.uname().nodename, release, "; ".join(problems)), **result)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
