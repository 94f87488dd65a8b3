#!/bin/sh
# Entry point of the meshvpn image: the first argument picks the role, the rest is passed on.
#
#   registrar [ARGS]   meshvpn-registrar run ARGS; first writes a reusable join token to $MESHVPN_JOIN_TOKEN_FILE
#                      (a volume the nodes share) unless that file exists already
#   node [ARGS]        meshvpn-agent run ARGS, with the join token (MESHVPN_JOIN_TOKEN, or the shared file),
#                      the container's own address as endpoint and userspace WireGuard
#   mosquitto          Mosquitto with the packaged meshvpn config (broker/mosquitto/), reloading the password
#                      file that the registrar writes whenever it changes
#   anything else      executed as is (meshctl, meshvpn-registrar tokens list, sh, ...)
set -eu

TOKEN_FILE=${MESHVPN_JOIN_TOKEN_FILE:-/run/meshvpn-join/token}
REGISTRAR_STATE=${MESHVPN_STATE_DIR:-/var/lib/meshvpn-registrar}

log() { echo "meshvpn-entrypoint: $*" >&2; }

# The container's address on its (first) network: the WireGuard endpoint the peers use. The agent's default
# is the address of the default route, and a compose network marked internal has none.
own_address() {
  hostname -i 2>/dev/null | tr ' ' '\n' | grep -v '^127\.' | grep -v ':' | head -n1
}

wait_for_file() { # path seconds
  i=0
  while [ ! -s "$1" ]; do
    i=$((i + 1))
    if [ "$i" -gt "$(($2 * 2))" ]; then
      return 1
    fi
    sleep 0.5
  done
}

role=${1:-}
case "$role" in
  registrar)
    shift
    mkdir -p "$REGISTRAR_STATE"
    if [ -n "${TOKEN_FILE}" ] && [ ! -s "$TOKEN_FILE" ]; then
      mkdir -p "$(dirname "$TOKEN_FILE")"
      umask 077
      # Reusable so that every scaled node (and a re-created one) can join with the same token; the compose
      # topology is a test bed: a production registrar hands out single-use tokens (docs/deploy.md).
      meshvpn-registrar tokens create --reusable ${MESHVPN_JOIN_TOKEN_TTL:+--ttl "$MESHVPN_JOIN_TOKEN_TTL"} \
        >"$TOKEN_FILE.tmp"
      mv "$TOKEN_FILE.tmp" "$TOKEN_FILE"
      chmod 0644 "$TOKEN_FILE"
      log "join token written to $TOKEN_FILE"
    fi
    exec meshvpn-registrar run "$@"
    ;;
  node)
    shift
    # compose passes an unset variable through as empty: make it unset for the agent's settings loader.
    [ -n "${MESHVPN_JOIN_TOKEN:-}" ] || unset MESHVPN_JOIN_TOKEN
    if [ -z "${MESHVPN_JOIN_TOKEN:-}" ]; then
      if [ -s "/var/lib/meshvpn/node_id" ] && [ ! -s "$TOKEN_FILE" ]; then
        : # already a member: a restart needs no token
      elif wait_for_file "$TOKEN_FILE" "${MESHVPN_JOIN_TOKEN_WAIT:-120}"; then
        MESHVPN_JOIN_TOKEN=$(cat "$TOKEN_FILE")
        export MESHVPN_JOIN_TOKEN
      else
        log "no MESHVPN_JOIN_TOKEN and no $TOKEN_FILE after ${MESHVPN_JOIN_TOKEN_WAIT:-120} s"
        exit 1
      fi
    fi
    endpoint=${MESHVPN_ENDPOINT:-$(own_address)}
    exec meshvpn-agent run --backend "${MESHVPN_BACKEND:-userspace}" ${endpoint:+--endpoint "$endpoint"} "$@"
    ;;
  mosquitto)
    shift
    conf_dir=/etc/mosquitto/meshvpn
    pkg=$(python3 -c 'import pathlib, broker; print(pathlib.Path(broker.__file__).parent / "mosquitto")' 2>/dev/null \
      || /opt/meshvpn/bin/python -c 'import pathlib, broker; print(pathlib.Path(broker.__file__).parent / "mosquitto")')
    passwords=${MESHVPN_MOSQUITTO_PASSWORDS:-$REGISTRAR_STATE/passwords}
    mkdir -p "$conf_dir"
    cp "$pkg/acl.conf" "$conf_dir/acl.conf"
    sed -e "s#^password_file .*#password_file $passwords#" -e "s#^acl_file .*#acl_file $conf_dir/acl.conf#" \
      "$pkg/mosquitto.conf" >"$conf_dir/mosquitto.conf"
    wait_for_file "$passwords" "${MESHVPN_PASSWORDS_WAIT:-120}" || { log "no password file $passwords"; exit 1; }
    mosquitto -c "$conf_dir/mosquitto.conf" "$@" &
    pid=$!
    trap 'kill -TERM "$pid" 2>/dev/null' TERM INT
    # The registrar adds a node's credentials to the password file when it registers; Mosquitto only reads
    # the file again on SIGHUP.
    last=$(stat -c %Y.%s "$passwords" 2>/dev/null || echo none)
    while kill -0 "$pid" 2>/dev/null; do
      sleep 1 &
      wait $! || true
      now=$(stat -c %Y.%s "$passwords" 2>/dev/null || echo none)
      if [ "$now" != "$last" ]; then
        last=$now
        kill -HUP "$pid" 2>/dev/null || true
      fi
    done
    wait "$pid"
    ;;
  "")
    exec meshvpn-agent --help
    ;;
  *)
    exec "$@"
    ;;
esac
