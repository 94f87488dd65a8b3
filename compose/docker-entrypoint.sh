#!/bin/sh
# Entry point of the meshvpn image: the first argument picks the role, the rest is passed on.
#
#   registrar [ARGS]   meshvpn-registrar run ARGS; first writes a reusable join token to $MESHVPN_JOIN_TOKEN_FILE
#                      (a volume the nodes share) unless that file exists already. Without --embedded-broker
#                      (Mosquitto) it also issues its own broker password and, with MESHVPN_PROVISION_NODES=N,
#                      broker credentials for N node ids, into the shared volume for nodes to claim
#   node [ARGS]        meshvpn-agent run ARGS, with the join token (MESHVPN_JOIN_TOKEN, or the shared file),
#                      the container's own address as endpoint and userspace WireGuard; with
#                      MESHVPN_CLAIM_CREDENTIALS=1 it first claims one of the pre-issued node ids
#   mosquitto          Mosquitto with meshvpn's config (`meshvpn-broker mosquitto-config`), reloading the password
#                      file that the registrar writes whenever it changes
#   anything else      executed as is (meshctl, meshvpn-registrar tokens list, sh, ...)
set -eu

TOKEN_FILE=${MESHVPN_JOIN_TOKEN_FILE:-/run/meshvpn-join/token}
CREDENTIALS_DIR=$(dirname "$TOKEN_FILE")/credentials
AGENT_STATE=/var/lib/meshvpn
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
    case " $* " in
      *" --embedded-broker "*) ;;
      *)
        # An external broker (Mosquitto) knows only the password file: the registrar needs an account there,
        # and nodes need theirs before their first connection (Mosquitto cannot check join tokens).
        umask 077
        if [ ! -s "$REGISTRAR_STATE/registrar_broker_password" ]; then
          meshvpn-registrar credentials issue registrar >"$REGISTRAR_STATE/registrar_broker_password"
        fi
        MESHVPN_BROKER__PASSWORD=$(cat "$REGISTRAR_STATE/registrar_broker_password")
        export MESHVPN_BROKER__PASSWORD
        if [ -n "${MESHVPN_PROVISION_NODES:-}" ] && [ ! -e "$CREDENTIALS_DIR/.ready" ]; then
          mkdir -p "$CREDENTIALS_DIR/claims"
          i=1
          while [ "$i" -le "$MESHVPN_PROVISION_NODES" ]; do
            [ -s "$CREDENTIALS_DIR/node$i" ] || meshvpn-registrar credentials issue "node$i" >"$CREDENTIALS_DIR/node$i"
            i=$((i + 1))
          done
          # Test bed only: every node container can read every node's password from this shared volume.
          chmod -R a+rX "$CREDENTIALS_DIR"
          chmod a+rwx "$CREDENTIALS_DIR/claims"
          echo ready >"$CREDENTIALS_DIR/.ready"
          log "broker credentials for node1..node$MESHVPN_PROVISION_NODES in $CREDENTIALS_DIR"
        fi
        umask 022
        ;;
    esac
    exec meshvpn-registrar run "$@"
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
    if [ "${MESHVPN_CLAIM_CREDENTIALS:-0}" = 1 ]; then
      # Take the first pre-issued node id nobody has taken (mkdir is atomic on the shared volume) and keep
      # it in this node's own state, so a restart comes back as the same node.
      mkdir -p "$AGENT_STATE"
      if [ ! -s "$AGENT_STATE/claimed_id" ]; then
        wait_for_file "$CREDENTIALS_DIR/.ready" "${MESHVPN_JOIN_TOKEN_WAIT:-120}" || {
          log "no pre-issued credentials in $CREDENTIALS_DIR"; exit 1; }
        for cred in "$CREDENTIALS_DIR"/node*; do
          id=$(basename "$cred")
          if mkdir "$CREDENTIALS_DIR/claims/$id" 2>/dev/null; then
            echo "$id" >"$AGENT_STATE/claimed_id"
            break
          fi
        done
        [ -s "$AGENT_STATE/claimed_id" ] || { log "every pre-issued node id is taken (MESHVPN_PROVISION_NODES)"; exit 1; }
      fi
      MESHVPN_NODE_ID=$(cat "$AGENT_STATE/claimed_id")
      MESHVPN_BROKER__PASSWORD=$(cat "$CREDENTIALS_DIR/$MESHVPN_NODE_ID")
      export MESHVPN_NODE_ID MESHVPN_BROKER__PASSWORD
      log "claimed node id $MESHVPN_NODE_ID"
    fi
    endpoint=${MESHVPN_ENDPOINT:-$(own_address)}
    exec meshvpn-agent run --backend "${MESHVPN_BACKEND:-userspace}" ${endpoint:+--endpoint "$endpoint"} "$@"
    ;;
  mosquitto)
    shift
    conf_dir=/etc/mosquitto/meshvpn
    pkg=$(/opt/meshvpn/bin/python -c 'import pathlib, broker; print(pathlib.Path(broker.__file__).parent / "mosquitto")')
    src=${MESHVPN_MOSQUITTO_PASSWORDS:-/var/lib/meshvpn-broker/passwords}
    mkdir -p "$conf_dir"
    cp "$pkg/acl.conf" "$conf_dir/acl.conf"
    # The same renderer as the packaged mosquitto.conf, with this container's paths.
    meshvpn-broker mosquitto-config --password-file "$conf_dir/passwords" --acl-file "$conf_dir/acl.conf" \
      >"$conf_dir/mosquitto.conf"
    wait_for_file "$src" "${MESHVPN_PASSWORDS_WAIT:-120}" || { log "no password file $src"; exit 1; }
    # Mosquitto drops root and then reads the password file as its own user on every reload: give it a copy
    # it owns, the way meshvpn-mosquitto-reload does.
    install -o mosquitto -g mosquitto -m 0600 "$src" "$conf_dir/passwords"
    mosquitto -c "$conf_dir/mosquitto.conf" "$@" &
    pid=$!
    trap 'kill -TERM "$pid" 2>/dev/null' TERM INT
    # The registrar rewrites its file (temp + rename) when it issues credentials; Mosquitto only reads it
    # again on SIGHUP. Inode + mtime + size: a rename always changes the inode.
    last=$(stat -c %i.%Y.%s "$src" 2>/dev/null || echo none)
    while kill -0 "$pid" 2>/dev/null; do
      sleep 1 &
      wait $! || true
      now=$(stat -c %i.%Y.%s "$src" 2>/dev/null || echo none)
      if [ "$now" != "$last" ] && [ "$now" != none ]; then
        last=$now
        install -o mosquitto -g mosquitto -m 0600 "$src" "$conf_dir/passwords"
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
