#!/usr/bin/env bash
# Control-plane outage: the registrar (and the embedded broker it hosts) stops for 4x the heartbeat TTL.
# The data plane does not depend on it: a continuous ping between two nodes loses nothing, no tunnel is
# removed, and when the registrar returns its grace period keeps it from declaring anyone unreachable.
source "$(dirname "$0")/lib.sh"
step up --nodes 4
step wait
step status
N2_IP=$(lab status --json | "$REPO/.venv/bin/python" -c \
  'import json, sys; print(next(n["mesh_ip"] for n in json.load(sys.stdin)["nodes"] if n["name"] == "n2"))')
say "continuous ping n1 -> n2 ($N2_IP) every 0.2 s for 40 s, in the background"
lab exec n1 -- ping -n -q -i 0.2 -w 40 "$N2_IP" > "$LAB_DIR/ping.log" 2>&1 &
PING_PID=$!
sleep 2
say "stop the registrar (and its embedded broker)"
step registrar stop
for i in 1 2 3 4; do
  sleep 3
  say "control plane down for $((i * 3)) s:"
  step status
done
step ping
say "start the registrar again"
step registrar start
sleep 8
step status
step wait
wait "$PING_PID" || true
say "continuous ping n1 -> n2 across the outage:"
tail -n 3 "$LAB_DIR/ping.log" | sed 's/^/            /'
say "registrar decisions and agent tunnel changes (service timestamps, UTC; none after the joins):"
events
