"""The contract every meshvpn component speaks: MQTT topics, message models, the agent's local API.

This package imports nothing from the services (broker, registrar, nodeagent, desktop_chat); they import it.
"""

PROTOCOL_VERSION = 1
