#!/usr/bin/python
# Copyright: seamless developers; GNU General Public License v2.0 only
from __future__ import annotations

DOCUMENTATION = r"""
module: seamless_result
short_description: What a seamless upgrade did, read in the host's new boot
description:
  - Runs C(seamless status --json) on the host after its upgrade and checks that the
    host came back from this upgrade, on the expected kernel, with every process tree.
  - Fails with the state the host is in and what to do (a retry by hand) otherwise.
options:
  boot_id_before:
    description: The boot id before the upgrade (/proc/sys/kernel/random/boot_id).
    type: str
    required: true
  release:
    description: The kernel release the host should run now.
    type: str
    required: true
  seamless:
    description: The seamless command.
    type: str
    default: seamless
author: seamless developers
"""

RETURN = r"""
release: {description: the release the host runs, type: str, returned: always}
came_back: {description: the host runs a new boot, type: bool, returned: always}
trees_restored: {description: trees running again, type: int, returned: always}
trees_failed: {description: trees that did not come back, with why, type: list, returned: always}
blackout_seconds: {description: freeze to restored, type: float, returned: always}
generation: {description: the store's generation of the upgrade, type: int, returned: always}
"""

import os  # noqa: E402

from ansible.module_utils.basic import AnsibleModule  # noqa: E402
from ansible_collections.seamless.kernel.plugins.module_utils.seamless import (  # noqa: E402
    upgrade_outcome,
)


def main():
    module = AnsibleModule(
        argument_spec={"boot_id_before": {"type": "str", "required": True},
                       "release": {"type": "str", "required": True},
                       "seamless": {"type": "str", "default": "seamless"}},
        supports_check_mode=True,
    )
    rc, out, err = module.run_command([module.params["seamless"], "status", "--json"])
    try:
        ok, facts, message = upgrade_outcome(rc, out, module.params["boot_id_before"].strip(),
                                             os.uname().release, module.params["release"])
    except ValueError as e:
        module.fail_json(msg=f"{e} ({err.strip()})")
    if not ok:
        module.fail_json(msg=message, **facts)
    module.exit_json(changed=False, msg=message, **facts)


if __name__ == "__main__":
    main()
