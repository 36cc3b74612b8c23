#!/usr/bin/env bash
# Installs Debian's chromium and chromium-driver for the dashboard's browser test
# (tests/service/test_dashboard.py), if missing. Idempotent; needs root and Debian's apt.
set -euo pipefail
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then exit 0; fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
  echo "browser.sh: cannot install chromium here (needs root + apt); the browser test skips" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq chromium chromium-driver >/dev/null
echo "browser.sh: $(chromium --version 2>/dev/null | head -1)"
