"""meshchat: the messaging demonstration that proves the VPN data plane.

Two nodes talk directly over their mesh IPs (TCP, port 7800 by default) with an application-level
acknowledgement; nothing goes through the broker, the registrar or any relay. Names are display only.
The Qt window (desktop_chat.window) is optional; the headless `send`/`listen` commands need no Qt.
"""

DEFAULT_PORT = 7800
