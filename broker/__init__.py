"""The MQTT broker layer of meshvpn: the embedded amqtt broker made correct for this use, and Mosquitto's config.

`broker.embedded.EmbeddedBroker` runs amqtt in its own thread; `broker/mosquitto/` holds the Mosquitto
configuration enforcing the same access rules (meshcontract.access). See docs/broker.md.
"""
