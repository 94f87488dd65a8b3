"""Whether the embedded broker lets a CONNECT in, given what was checked about it. No I/O here.

Credentials are checked elsewhere (the password file); this module adds the rules that make the
embedded broker behave like Mosquitto configured with broker/mosquitto/: a node's client id is its username
(Mosquitto forces it with use_username_as_clientid; we refuse a different one, so no client can occupy or take
over another node's session), and a will is a publish like any other, so it must be allowed by the ACL.
"""

from __future__ import annotations

from meshcontract import access, topics


def refusal(
    *,
    username: str | None,
    client_id: str,
    credentials_ok: bool,
    allow_anonymous: bool,
    will_topic: str | None,
    mesh: str | None = None,
) -> str | None:
    """Why this CONNECT is refused, or None to accept it. `credentials_ok` is the password check; `mesh` the
    mesh the broker serves (a will is a publish: it must be allowed there)."""
    if username is None:
        if not allow_anonymous:
            return "anonymous access is not allowed"
        # An anonymous client may not squat a client id a node could use: taking over is disconnecting.
        if topics.is_valid_id(client_id):
            return f"anonymous clients may not use node-shaped client id {client_id!r}"
    else:
        role = access.role_of(username)
        if role is None:
            return f"unknown username {username!r}"
        if not credentials_ok:
            return f"bad credentials for {username!r}"
        # For every account, not only nodes: an observer with the registrar's client id would take the registrar's
        # session over (found by an attacker's test: 12 kicks in 10 s, each restarting the grace period).
        if client_id != username:
            return f"{username!r} must use its username as client id, not {client_id!r}"
    if will_topic is not None and not access.may_publish(username, will_topic, mesh=mesh):
        return f"{username!r} may not publish its will on {will_topic!r}"
    return None
