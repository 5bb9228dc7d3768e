#!/usr/bin/env bash
# The browser of the browser tests: Debian's own Chromium, installed from the
# distribution's packages when missing. Playwright drives it through its
# executable path; nothing here (or anywhere in the project) downloads a browser
# build of its own.
#
# Usage: scripts/browser.sh [path]    install if missing, then print the executable's path
# Environment: CHROMIUM (/usr/bin/chromium)
set -euo pipefail

CHROMIUM="${CHROMIUM:-/usr/bin/chromium}"

log() { echo "browser.sh: $*" >&2; }

if [[ ! -x "$CHROMIUM" ]]; then
  command -v apt-get >/dev/null || { log "error: $CHROMIUM missing and no apt-get to install it"; exit 1; }
  sudo_=""
  [[ "$(id -u)" != 0 ]] && sudo_="sudo"
  log "installing Debian's chromium package"
  # The package lists may be missing or stale on a fresh machine.
  $sudo_ apt-get update -qq >/dev/null
  # DejaVu: the page and its screenshot show Cyrillic and Latin text.
  DEBIAN_FRONTEND=noninteractive $sudo_ apt-get install -y -qq --no-install-recommends \
    chromium fonts-dejavu-core >/dev/null
fi
[[ -x "$CHROMIUM" ]] || { log "error: $CHROMIUM still missing after the install"; exit 1; }
echo "$CHROMIUM"
