#!/usr/bin/env bash
# Broker restart with Mosquitto: stopping Mosquitto publishes the last will of every connected node, and the
# registrar may be the last client it drops — so it hears "n1 offline, n2 offline, ..." just before it loses
# the broker (and makes those nodes suspect). It takes those wills back when it reconnects (before
# republishing anything), so no peer removes a tunnel, and a continuous ping between two nodes loses nothing.
source "$(dirname "$0")/lib.sh"
step up --nodes 4 --broker mosquitto
step wait
ping_n1_n2 0.1 25
sleep 2
say "stop Mosquitto (SIGTERM: it publishes every client's will on the way down)"
step broker stop
sleep 6
step status
say "start Mosquitto again"
step broker start
sleep 8
step status
step wait
wait "$PING_PID" || true
say "continuous ping n1 -> n2 across the restart:"
tail -n 3 "$LAB_DIR/ping.log" | sed 's/^/            /'
say "wills the registrar heard as Mosquitto went down, and what it did on reconnection:"
grep -hE "last will|lost the broker|came as the broker went away|reconnected" "$LAB_DIR/control/registrar.log" \
  | sed -E 's/ epoch=[0-9]+//' | cut -c1-200 | sed 's/^/            /'
say "registrar decisions and agent tunnel changes (no 'peer removed' after the joins):"
events
