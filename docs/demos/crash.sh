#!/usr/bin/env bash
# Node crash: SIGKILL a node's agent AND its wireguard-go (a machine crash). Nothing says goodbye: the
# registrar notices the broken connection (last will) or the missing heartbeats (TTL) and makes the node
# suspect; the others' probes over the mesh get no answer, so vouch_wait_s later it is unreachable and every
# other agent removes its tunnel. Restarted from its state dir, the node keeps its mesh IP.
source "$(dirname "$0")/lib.sh"
step up --nodes 4
step wait
step ping --tcp
step status
say "crash n3"
step crash n3
step wait --timeout 30
step status
step ping
say "restart n3 from its state dir (same key, same node id)"
step start n3
step wait --timeout 30
step status
step ping --tcp
say "registrar decisions and agent tunnel changes (service timestamps, UTC):"
events
