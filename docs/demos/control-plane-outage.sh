#!/usr/bin/env bash
# Control-plane outage: the registrar (and the embedded broker it hosts) stops for 4x the heartbeat TTL.
# The data plane does not depend on it: a continuous ping between two nodes loses nothing, no tunnel is
# removed, and when the registrar returns its grace period keeps it from declaring anyone unreachable.
source "$(dirname "$0")/lib.sh"
step up --nodes 4
step wait
step status
ping_n1_n2 0.2 40
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
