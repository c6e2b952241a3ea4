#!/usr/bin/env bash
# Installs everything pmkv needs on a fresh Debian 12 machine: Debian packages for the build and a
# Python virtual environment (.venv) with the PyPI packages the tools and test clients use.
# Idempotent: a second run only checks. Needs root (or sudo) for apt-get.
set -euo pipefail
cd "$(dirname "$0")/.."

DEB_PACKAGES=(
  build-essential cmake ninja-build ccache pkg-config git
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
  libspdlog-dev libfmt-dev libyaml-cpp-dev libsentencepiece-dev sentencepiece
  catch2 libopenblas-dev nlohmann-json3-dev libboost-dev
  clang libclang-rt-14-dev
  python3 python3-venv python3-pip
)

missing=()
for p in "${DEB_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# Python: a project-local venv (Debian's python refuses system-wide pip installs, PEP 668).
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -r scripts/requirements.txt
echo "setup: ok"
