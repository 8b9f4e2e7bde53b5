# shellcheck shell=bash
# Sourced by dev/demo.sh and dev/test.sh: installs what the project needs on a
# Debian 12 machine (as root) and creates .venv with the project in it.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PATH="$ROOT/.venv/bin:$PATH"

APT_PACKAGES=(
    qemu-system-x86 qemu-utils mmdebstrap e2fsprogs
    python3 python3-venv python3-pip git ca-certificates
    protobuf-compiler python3-protobuf shellcheck openssh-client
    ansible-core
)

phase() { printf '\n=== %s (%s)\n' "$*" "$(date +%T)" >&2; }

timed() {
    local name=$1 start=$SECONDS
    shift
    "$@"
    printf '=== %s: %d s\n' "$name" $((SECONDS - start)) >&2
}

install_apt() {
    local missing=()
    for pkg in "${APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" ||
            missing+=("$pkg")
    done
    if ((${#missing[@]})); then
        if [[ $(id -u) != 0 ]]; then
            echo "missing Debian packages: ${missing[*]} (run as root, or apt-get install them)" >&2
            exit 1
        fi
        apt-get update -q
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
    fi
    # apt-cache must know the archive's kernels (the image build checks they exist).
    if [[ $(id -u) == 0 ]] && ! apt-cache show linux-image-cloud-amd64 >/dev/null 2>&1; then
        apt-get update -q
    fi
}

install_venv() {
    if [[ ! -x $ROOT/.venv/bin/python ]]; then
        /usr/bin/python3 -m venv "$ROOT/.venv"
    fi
    "$ROOT/.venv/bin/python" -m pip install -q --upgrade pip
    "$ROOT/.venv/bin/python" -m pip install -q -e "${ROOT}[test]"
}

bootstrap() {
    phase "installing Debian packages"
    timed "Debian packages" install_apt
    phase "installing Python packages into .venv"
    timed "Python packages" install_venv
}
