#!/bin/sh
# Install the cdae services on this host, or stage them below $DESTDIR to look first:
#   sudo systemd/install.sh                       # user cdae, /etc/cdae, model store, units; enables them
#   DESTDIR=/tmp/stage systemd/install.sh         # the same files below /tmp/stage; no useradd, no systemctl
# VENV (default /opt/cdae/venv) must hold cdae already (pip install '/path/to/cdae[gpu]').
# An existing /etc/cdae/site.toml is kept; the EPICS env file and the units are regenerated from it.
# Further arguments go to `cdae systemd install` (see `cdae systemd install --help`).
set -eu
VENV="${VENV:-/opt/cdae/venv}"
SRC="$(cd "$(dirname "$0")/.." && pwd)"
CDAE="$VENV/bin/cdae"
if [ ! -x "$CDAE" ]; then
    echo "install.sh: $CDAE not found; first: python3 -m venv $VENV && $VENV/bin/pip install '$SRC[gpu]'" >&2
    exit 1
fi
set -- --venv "$VENV" --example "$SRC/deploy/site.example.toml" --models-from "$SRC/models" "$@"
if [ -n "${DESTDIR:-}" ]; then
    set -- --destdir "$DESTDIR" "$@"
fi
exec "$CDAE" systemd install "$@"
