"""meshvpn node agent: the daemon on every machine (`meshvpn-agent`) and its local tool (`meshctl`).

Pure cores: `membership` (the view of the mesh built from retained MQTT state), `reconcile` (desired peers
and the plan to reach them), `session` (epochs, backoff). I/O at the edges: `statestore` (the state
directory), `agent` (MQTT session, WireGuard backends, loops), `localapi_server` (unix socket), `ping`.
"""
