# Shared by the scenario scripts: a private lab directory, a `lab` command, timestamps, cleanup on exit.
# Sourced, not run. Needs root and a bootstrapped checkout (scripts/bootstrap).
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
LAB_DIR=${LAB_DIR:-$(mktemp -d /tmp/meshlab-scenario.XXXXXX)}
MESHLAB=("$REPO/.venv/bin/python" -m meshlab.cli --lab-dir "$LAB_DIR")
T0=$(date +%s.%N)
echo "scenario $(basename "$0") started at $(date -u +%H:%M:%S.%3N) UTC; lines below: seconds since then"

lab() { "${MESHLAB[@]}" "$@"; }

# A line stamped with seconds since the scenario started.
say() { printf '+%7.2fs  %s\n' "$(awk -v now="$(date +%s.%N)" -v t0="$T0" 'BEGIN { print now - t0 }')" "$*"; }

# Run a lab command, echoing it first.
step() { say "\$ meshlab $*"; lab "$@" 2>&1 | sed 's/^/            /'; }

# Membership decisions of the registrar and tunnel changes of every agent, merged in time order (wall clock,
# as the services stamp them): the evidence of convergence.
events() {
  {
    grep -hE "member (joined|active|suspect|control plane lost|unreachable|left|removed)" "$LAB_DIR/control/registrar.log" 2>/dev/null \
      | sed 's|^|registrar: |' || true
    for f in "$LAB_DIR"/nodes/*/agent.log; do
      grep -hE "peer (added|removed|updated)" "$f" | sed "s|^|$(basename "$(dirname "$f")"): |" || true
    done
  } | sort -s -k2,2 | sed -E 's/ peer=[^ ]+//; s/ epoch=[0-9]+//' | cut -c1-200
}

# Continuous ping n1 -> n2 over the mesh in the background, into $LAB_DIR/ping.log; sets PING_PID.
# Usage: ping_n1_n2 INTERVAL_S DURATION_S
ping_n1_n2() {
  local ip
  ip=$(lab status --json | "$REPO/.venv/bin/python" -c \
    'import json, sys; print(next(n["mesh_ip"] for n in json.load(sys.stdin)["nodes"] if n["name"] == "n2"))')
  say "continuous ping n1 -> n2 ($ip) every $1 s for $2 s, in the background"
  lab exec n1 -- ping -n -q -i "$1" -w "$2" "$ip" > "$LAB_DIR/ping.log" 2>&1 &
  PING_PID=$!
}

cleanup() { say "cleaning up"; lab down >/dev/null 2>&1 || true; rm -rf "$LAB_DIR"; }
trap cleanup EXIT
trap 'exit 130' INT TERM
[ "$(id -u)" = 0 ] || { echo "needs root" >&2; exit 1; }
