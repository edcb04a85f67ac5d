#!/usr/bin/env bash
# Installs Debian's pocketsphinx-testdata (real speech recordings, BSD-2): the audio front end's
# tests read them (they are skipped, with the reason, where the package is absent).
set -euo pipefail
if [ -d /usr/share/pocketsphinx/test/data ]; then
  exit 0
fi
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "Installing speech test recordings (Debian package pocketsphinx-testdata) ..."
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pocketsphinx-testdata
else
  echo "pocketsphinx-testdata is not installed (sudo apt-get install pocketsphinx-testdata);" \
       "the tests on real speech will be skipped" >&2
fi
