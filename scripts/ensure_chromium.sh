#!/usr/bin/env bash
# Installs Debian's chromium for the browser tests when it is missing and we may (root + apt).
# Where it cannot be installed, the browser tests skip and say why.
set -u
CHROMIUM=${QP_CHROMIUM:-/usr/bin/chromium}
if [ -x "$CHROMIUM" ]; then exit 0; fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing chromium for the browser tests (apt-get)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null \
    || echo "chromium could not be installed; browser tests will be skipped"
else
  echo "chromium not found at $CHROMIUM and cannot be installed here; browser tests will be skipped"
fi
exit 0
