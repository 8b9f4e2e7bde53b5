#!/usr/bin/env bash
# The demo: build the guest, boot kernel A, kexec into kernel B, show what happened.
source "$(dirname "$0")/bootstrap.sh"
bootstrap
phase "demo"
cd "$ROOT"
exec .venv/bin/python vm-tests/vm demo "$@"
