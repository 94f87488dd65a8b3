#!/usr/bin/env bash
# Network partition: n4's only underlay link goes down. It can reach neither the broker nor any peer; the
# registrar makes it suspect, no probe reaches it, so it is unreachable and the others drop its tunnel. n4 itself keeps its last known peers (it
# cannot tell a partition from a control-plane outage). Healed, it reconnects and everybody converges.
source "$(dirname "$0")/lib.sh"
step up --nodes 4
step wait
step status
say "partition n4"
step partition n4
step wait --timeout 30
step status
step ping
say "heal n4"
step heal n4
step wait --timeout 40
step status
step ping --tcp
say "registrar decisions and agent tunnel changes (service timestamps, UTC):"
events
