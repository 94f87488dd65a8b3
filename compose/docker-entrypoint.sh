#!/bin/sh
# Entry point of the meshvpn image: the first argument picks the role, the rest is passed on.
#
#   registrar [ARGS]   meshvpn-registrar run ARGS; once it serves, writes a reusable join token (with the CA pin)
#                      to $MESHVPN_JOIN_TOKEN_FILE (a volume the nodes share) unless that file exists already.
#                      With MESHVPN_MOSQUITTO_DIR set (Mosquitto as the broker) it first prepares that
#                      directory once: `meshvpn-registrar mosquitto init` (accounts, TLS certificate)
#   node [ARGS]        meshvpn-agent run ARGS: enrolls over HTTPS with the join token (MESHVPN_JOIN_TOKEN, or
#                      the shared file), the container's own address as endpoint, userspace WireGuard
#   mosquitto          Mosquitto with meshvpn's config (`meshvpn-broker mosquitto-config`) and the files the
#                      registrar prepared in $MESHVPN_MOSQUITTO_DIR
#   anything else      executed as is (meshctl, meshvpn-registrar tokens list, sh, ...)
set -eu

TOKEN_FILE=${MESHVPN_JOIN_TOKEN_FILE:-/run/meshvpn-join/token}
AGENT_STATE=/var/lib/meshvpn
REGISTRAR_STATE=${MESHVPN_STATE_DIR:-/var/lib/meshvpn-registrar}

log() { echo "meshvpn-entrypoint: $*" >&2; }

# The container's address on its (first) network: the WireGuard endpoint the peers use, advertised as the
# node's public candidate (the agent advertises its interface addresses too; docs/agent.md).
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
    if [ -n "${MESHVPN_MOSQUITTO_DIR:-}" ] && [ ! -s "$MESHVPN_MOSQUITTO_DIR/dynamic-security.json" ]; then
      # Once, before Mosquitto (waiting for these files) starts: its accounts and the registrar's certificate.
      meshvpn-registrar mosquitto init --dir "$MESHVPN_MOSQUITTO_DIR" --owner mosquitto \
        ${MESHVPN_TLS_NAME:+--tls-name "$MESHVPN_TLS_NAME"} >/dev/null
      log "Mosquitto prepared in $MESHVPN_MOSQUITTO_DIR"
    fi
    meshvpn-registrar run "$@" &
    pid=$!
    trap 'kill -TERM "$pid" 2>/dev/null' TERM INT
    if [ -n "${TOKEN_FILE}" ] && [ ! -s "$TOKEN_FILE" ]; then
      mkdir -p "$(dirname "$TOKEN_FILE")"
      umask 077
      # Reusable so that every scaled node (and a re-created one) can join with the same token; the compose
      # topology is a test bed: a production registrar hands out single-use tokens (docs/deploy.md). The
      # command talks to the running registrar (its admin socket): wait until it answers.
      i=0
      until meshvpn-registrar tokens create --reusable ${MESHVPN_JOIN_TOKEN_TTL:+--ttl "$MESHVPN_JOIN_TOKEN_TTL"} \
          >"$TOKEN_FILE.tmp" 2>/dev/null; do
        i=$((i + 1))
        if [ "$i" -gt 240 ] || ! kill -0 "$pid" 2>/dev/null; then
          log "the registrar did not come up: no join token"
          break
        fi
        sleep 0.5
      done
      if [ -s "$TOKEN_FILE.tmp" ]; then
        mv "$TOKEN_FILE.tmp" "$TOKEN_FILE"
        chmod 0644 "$TOKEN_FILE"
        log "join token written to $TOKEN_FILE"
      fi
      umask 022
    fi
    wait "$pid"
    ;;
  node)
    shift
    # compose passes an unset variable through as empty: make it unset for the agent's settings loader.
    [ -n "${MESHVPN_JOIN_TOKEN:-}" ] || unset MESHVPN_JOIN_TOKEN
    if [ -z "${MESHVPN_JOIN_TOKEN:-}" ]; then
      if [ -s "$AGENT_STATE/node_id" ] && [ ! -s "$TOKEN_FILE" ]; then
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
    conf_dir=${MESHVPN_MOSQUITTO_DIR:-/etc/mosquitto/meshvpn}
    wait_for_file "$conf_dir/dynamic-security.json" "${MESHVPN_MOSQUITTO_WAIT:-120}" || {
      log "no $conf_dir/dynamic-security.json: the registrar prepares it (meshvpn-registrar mosquitto init)"; exit 1; }
    # The same renderer as the packaged mosquitto.conf, with this container's paths: TLS for everyone on 8883,
    # plain TCP on loopback only.
    meshvpn-broker mosquitto-config --dynsec-file "$conf_dir/dynamic-security.json" \
      --certfile "$conf_dir/server.pem" --keyfile "$conf_dir/server.key" >/tmp/mosquitto.conf
    exec mosquitto -c /tmp/mosquitto.conf "$@"
    ;;
  "")
    exec meshvpn-agent --help
    ;;
  *)
    exec "$@"
    ;;
esac
