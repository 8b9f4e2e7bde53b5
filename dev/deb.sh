#!/usr/bin/env bash
# Build the Debian package from this tree: dist/seamless_VERSION_all.deb, checked by
# lintian. Installs what it needs (as root: debhelper, dh-python, lintian and the
# build dependencies from debian/control).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

BUILD_PACKAGES=(dpkg-dev debhelper dh-python pybuild-plugin-pyproject python3-all
    python3-setuptools python3-click python3-jinja2 python3-protobuf python3-psutil
    python3-pyudev python3-xxhash lintian)
missing=()
for pkg in "${BUILD_PACKAGES[@]}"; do
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

# Built in a copy: the build leaves debian/ and the tree's build/ behind otherwise.
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
tar -C "$ROOT" --exclude=./.git --exclude=./.venv --exclude=./dist --exclude=./build \
    --exclude='*.egg-info' --exclude=__pycache__ -cf - . | tar -C "$work" -xf -
mkdir -p "$work/src"
(cd "$work" && find . -mindepth 1 -maxdepth 1 ! -name src -exec mv {} src/ \;)
# Debian's own python3 and tools, whatever else PATH holds (a pyenv, the project's .venv).
(cd "$work/src" && PATH=/usr/sbin:/usr/bin:/sbin:/bin \
    dpkg-buildpackage -us -uc -b >"$work/build.log" 2>&1) || {
    tail -40 "$work/build.log" >&2
    exit 1
}
mkdir -p dist
version=$(dpkg-parsechangelog -l debian/changelog -S Version)
deb=dist/seamless_${version}_all.deb
cp "$work/seamless_${version}_all.deb" "$deb"
echo "built $deb ($(du -k "$deb" | cut -f1) KiB)"
# lintian: errors fail the build, warnings are shown (overrides: debian/seamless.lintian-overrides)
PATH=/usr/sbin:/usr/bin:/sbin:/bin lintian --fail-on error --info "$deb"
