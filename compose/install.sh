#!/usr/bin/env bash
# Installs meshvpn on a Debian/Ubuntu host: a venv in /opt/meshvpn with the wheel and its dependencies, the
# commands in /usr/local/bin (and their bash completion, where bash-completion is installed), the systemd units,
# example configs in /etc/meshvpn and a `meshvpn` system user for the registrar. Idempotent: a second run changes nothing (and says so); configs that exist are never
# overwritten. It enables and starts nothing: see the next steps it prints, and docs/deploy.md.
#
# Usage (root):
#   compose/install.sh [--wheel FILE] [--wheel-dir DIR] [--mosquitto] [--no-apt] [--root DIR]
#     --wheel FILE   install this meshvpn wheel (default: build one from the checkout this script is in)
#     --wheel-dir DIR  take the dependencies from the wheels in DIR, never from a package index (machines
#                    without access to PyPI; compose/build-wheels.sh makes such a directory)
#     --mosquitto    also configure a local Mosquitto for meshvpn (config, and `meshvpn-registrar mosquitto
#                    init`: its accounts and TLS files in /etc/mosquitto/meshvpn, once)
#     --no-apt       do not install Debian packages (python3-venv, wireguard, ...)
#     --root DIR     install under DIR instead of / (packaging tests, image builds): no apt, no useradd,
#                    no systemctl
set -euo pipefail
# The venv must see only itself: a PYTHONPATH with a checkout (and its meshvpn.egg-info) would make pip call
# the wheel "already satisfied" and install nothing of it.
unset PYTHONPATH

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
ROOT=""
WHEEL=""
WHEEL_DIR=""
MOSQUITTO=0
APT=1
while [ $# -gt 0 ]; do
  case "$1" in
    --wheel) WHEEL=$(realpath "$2"); shift 2 ;;
    --wheel-dir) WHEEL_DIR=$(realpath "$2"); shift 2 ;;
    --mosquitto) MOSQUITTO=1; shift ;;
    --no-apt) APT=0; shift ;;
    --root) ROOT=$(realpath -m "$2"); APT=0; shift 2 ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "install: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

if [ -z "$ROOT" ] && [ "$(id -u)" != 0 ]; then
  echo "install: run as root (or use --root DIR for a staging install)" >&2
  exit 1
fi

PREFIX=/opt/meshvpn
VENV=$ROOT$PREFIX
BIN=$ROOT/usr/local/bin
UNITS=$ROOT/etc/systemd/system
ETC=$ROOT/etc/meshvpn
DOC=$ROOT/usr/share/doc/meshvpn
PIP=(-m pip install -q --disable-pip-version-check)
if [ -n "$WHEEL_DIR" ]; then
  if ! compgen -G "$WHEEL_DIR/*.whl" >/dev/null; then
    echo "install: --wheel-dir $WHEEL_DIR holds no wheels" >&2
    exit 2
  fi
  PIP+=(--no-index --find-links "$WHEEL_DIR")
fi
COMMANDS=(meshvpn-registrar meshvpn-broker meshvpn-agent meshctl meshchat meshlab)
changed=0

note() { echo "install: $*"; }

# Copy $1 to $2 with mode $3 (and owner $4 when not staging) only if the content differs.
put() {
  local src=$1 dst=$2 mode=$3 owner=${4:-}
  if [ -f "$dst" ] && cmp -s "$src" "$dst"; then
    return 0
  fi
  install -D -m "$mode" "$src" "$dst"
  if [ -n "$owner" ] && [ -z "$ROOT" ]; then
    chown "$owner" "$dst"
  fi
  note "wrote $dst"
  changed=1
}

# Like put, but never replaces an existing file: operators edit these.
put_config() {
  if [ -e "$2" ]; then
    return 0
  fi
  put "$@"
}

# --- Debian packages -------------------------------------------------------------------------------------
if [ "$APT" = 1 ]; then
  packages=(python3 python3-venv wireguard-tools wireguard-go iproute2 iputils-ping)
  [ "$MOSQUITTO" = 1 ] && packages+=(mosquitto mosquitto-clients)
  missing=()
  for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    note "apt-get install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    changed=1
  fi
fi

# --- venv + wheel ----------------------------------------------------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
  note "creating the venv $VENV"
  python3 -m venv "$VENV"
  changed=1
fi
workdir=$(mktemp -d)
trap 'rm -rf "$workdir"' EXIT
if [ -z "$WHEEL" ]; then
  # A clean copy of the checkout: setuptools builds in-tree and would reuse stale build/ leftovers.
  tar -C "$repo" -c --exclude=.git --exclude=.venv --exclude=build --exclude=dist --exclude='*.egg-info' \
    --exclude=__pycache__ --exclude=compose/wheels . | (mkdir -p "$workdir/src" && tar -C "$workdir/src" -x)
  SOURCE_DATE_EPOCH=315532800 "$VENV/bin/python" -m pip wheel -q --disable-pip-version-check --no-deps \
    --wheel-dir "$workdir" "$workdir/src" >/dev/null
  WHEEL=$(ls "$workdir"/meshvpn-*.whl)
fi
# The version number does not change with every build, so pip alone would call a new wheel "already
# satisfied": the wheel's hash decides whether to reinstall, and a meshvpn already in the venv is replaced with
# --force-reinstall. Into a venv without meshvpn one pip run does it all (pip is slow to start on small hosts).
stamp=$VENV/.meshvpn-wheel.sha256
sum=$(sha256sum "$WHEEL" | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$sum" ]; then
  note "installing $(basename "$WHEEL") into $VENV"
  installed_before=0
  compgen -G "$VENV/lib/python3*/site-packages/meshvpn-*.dist-info" >/dev/null && installed_before=1
  "$VENV/bin/python" "${PIP[@]}" "$WHEEL"
  if [ "$installed_before" = 1 ]; then
    "$VENV/bin/python" "${PIP[@]}" --force-reinstall --no-deps "$WHEEL"
  fi
  echo "$sum" >"$stamp"
  changed=1
fi

# --- commands --------------------------------------------------------------------------------------------
mkdir -p "$BIN"
for cmd in "${COMMANDS[@]}"; do
  # Links point at the final location ($PREFIX), which is what the systemd units run.
  if [ "$(readlink "$BIN/$cmd" 2>/dev/null)" != "$PREFIX/bin/$cmd" ]; then
    ln -sfn "$PREFIX/bin/$cmd" "$BIN/$cmd"
    note "linked $BIN/$cmd"
    changed=1
  fi
done

# --- bash completion -------------------------------------------------------------------------------------
# Only where bash-completion is installed: it loads completions/NAME the first time NAME is completed. The
# scripts come from the installed commands themselves (not from a checkout on PYTHONPATH).
COMPLETIONS=$ROOT/usr/share/bash-completion/completions
if [ -d "$COMPLETIONS" ]; then
  for cmd in "${COMMANDS[@]}"; do
    if env -u PYTHONPATH "$VENV/bin/$cmd" --print-completion bash >"$workdir/$cmd.bash"; then
      put "$workdir/$cmd.bash" "$COMPLETIONS/$cmd" 0644
    else
      echo "install: warning: no bash completion for $cmd ($cmd --print-completion bash failed)" >&2
    fi
  done
fi

# --- user, units, configs, docs --------------------------------------------------------------------------
# The registrar's own user; the group meshvpn is for people: its members may read the agent's status (the
# desktop chat), and nothing of the registrar's.
if [ -z "$ROOT" ] && ! getent passwd meshvpn-registrar >/dev/null; then
  useradd --system --user-group --home-dir /var/lib/meshvpn-registrar --no-create-home \
    --shell /usr/sbin/nologin --comment "meshvpn registrar" meshvpn-registrar
  note "created the system user meshvpn-registrar"
  changed=1
fi
if [ -z "$ROOT" ] && ! getent group meshvpn >/dev/null; then
  groupadd --system meshvpn
  note "created the group meshvpn (its members may read the agent's status: adduser USER meshvpn)"
  changed=1
fi
put "$here/systemd/meshvpn-registrar.service" "$UNITS/meshvpn-registrar.service" 0644
put "$here/systemd/meshvpn-agent.service" "$UNITS/meshvpn-agent.service" 0644
mkdir -p "$ETC"
# registrar.toml may hold the registrar's broker password; agent.toml may hold a join token.
put_config "$here/systemd/registrar.example.toml" "$ETC/registrar.toml" 0640 root:meshvpn-registrar
put_config "$here/systemd/agent.example.toml" "$ETC/agent.toml" 0600 root:root
for doc in "$repo"/docs/*.md; do
  [ -f "$doc" ] && put "$doc" "$DOC/$(basename "$doc")" 0644
done

if [ "$MOSQUITTO" = 1 ]; then
  pkg=$("$VENV/bin/python" -c 'import pathlib, broker; print(pathlib.Path(broker.__file__).parent / "mosquitto")')
  put "$pkg/mosquitto.conf" "$ROOT/etc/mosquitto/conf.d/meshvpn.conf" 0644
  if [ -z "$ROOT" ] && [ ! -s /etc/mosquitto/meshvpn/dynamic-security.json ]; then
    # Once: Mosquitto's accounts (the registrar's, its admin) and the registrar's TLS certificate; the registrar
    # keeps the two passwords in its state directory. Nodes need nothing: they enroll with a join token.
    install -d -o meshvpn-registrar -g meshvpn-registrar -m 0700 /var/lib/meshvpn-registrar
    "$VENV/bin/meshvpn-registrar" --config /etc/meshvpn/registrar.toml mosquitto init --owner mosquitto
    changed=1
  fi
fi

if [ "$changed" = 1 ] && [ -z "$ROOT" ] && [ -d /run/systemd/system ]; then
  systemctl daemon-reload
fi

if [ "$changed" = 0 ]; then
  note "nothing to do: already installed"
  exit 0
fi
cat <<EOF
install: done. Next steps (docs/deploy.md):
  control plane:  edit /etc/meshvpn/registrar.toml (tls_names: the name nodes reach this host by), then
                  systemctl enable --now meshvpn-registrar
                  sudo -u meshvpn-registrar meshvpn-registrar --config /etc/meshvpn/registrar.toml tokens create
  every node:     edit /etc/meshvpn/agent.toml (registrar_url, mesh, join_token), then
                  systemctl enable --now meshvpn-agent && meshctl status
  desktop users:  adduser USER meshvpn (then log in again): meshctl status and meshchat without root
EOF
if [ "$MOSQUITTO" = 1 ]; then
  echo "  mosquitto:      systemctl restart mosquitto (before the registrar: broker = mqtts://127.0.0.1:8883)"
fi
