"""Joining a mesh with nothing but a join token: fetch and pin the registrar's CA, then enroll over TLS.

    1. GET /v1/info (TLS not yet verified: we do not know the CA) -> the registrar's CA certificate; its
       SHA-256 must equal the pin in the join token, else we stop: someone else answered.
    2. POST /v1/enroll over TLS verified against that CA only, with the token and our own broker password
       -> mesh IP, mesh settings, broker URL and the registrar's membership signing key.
The token goes to the registrar and nowhere else; nothing is created on this machine (no interface, no
WireGuard process) before the registrar said yes. Transient failures are retried with backoff until the
caller stops us; a refusal (bad, used or expired token, revoked key...) ends it with EnrollmentRefused.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import logging
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit

from meshcontract import jointoken
from meshcontract.errors import ContractError
from meshcontract.messages import (
    Endpoint,
    EnrollReply,
    EnrollRequest,
    ErrorCode,
    Reflection,
    RegistrarInfo,
    decode,
)
from nodeagent import policy
from nodeagent.errors import AgentError, EnrollmentRefused, SettingsError
from nodeagent.identity import Identity
from nodeagent.settings import AgentSettings
from nodeagent.statestore import Enrollment, Registration, StateStore

log = logging.getLogger(__name__)

_TIMEOUT_S = 10.0
_MAX_REPLY = 64 * 1024


class TransientError(AgentError):
    """The registrar could not be asked (unreachable, TLS failure, 5xx): worth another try later."""


def pin_of(ca_pem: str) -> str:
    """base64url(SHA-256(DER)) of a PEM certificate, as in the join token; ValueError if it is not one.

    The ssl module decodes the PEM and OpenSSL parses the DER as a certificate: the agent needs no X.509 library
    for this (cryptography.x509 cost ~0.6 MB and ~25 ms at every start, docs/benchmarks.md "agent footprint").
    """
    try:
        der = ssl.PEM_cert_to_DER_cert(ca_pem.strip())
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=der)
    except (ValueError, ssl.SSLError) as exc:  # binascii.Error is a ValueError
        raise ValueError(f"not a PEM certificate: {exc}") from exc
    return base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode()


def client_context(ca_pem: str | None) -> ssl.SSLContext:
    """TLS that trusts only the mesh's CA (or, before we know it, nothing: the caller checks the pin).

    No host name check: the CA is the registrar's own and signs nothing but its server certificate, so a
    certificate chaining to it is the registrar, whatever name or address we reached it by.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False
    if ca_pem is None:
        context.verify_mode = ssl.CERT_NONE
    else:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cadata=ca_pem)
    return context


@dataclass(frozen=True, slots=True)
class _Url:
    host: str
    port: int
    tls: bool

    @classmethod
    def parse(cls, url: str) -> _Url:
        parts = urlsplit(url)
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise SettingsError(f"registrar URL must be https://HOST[:PORT], got {url!r}")
        tls = parts.scheme == "https"
        return cls(parts.hostname, parts.port or (8443 if tls else 8080), tls)


def _request(
    url: _Url,
    method: str,
    path: str,
    body: bytes | None,
    ca_pem: str | None,
    *,
    headers: dict[str, str] | None = None,
    timeout: float = _TIMEOUT_S,
) -> tuple[int, bytes]:
    if url.tls:
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(
            url.host, url.port, timeout=timeout, context=client_context(ca_pem)
        )
    else:
        conn = http.client.HTTPConnection(url.host, url.port, timeout=timeout)
    try:
        sent = {"Content-Type": "application/json"} if body else {}
        conn.request(method, path, body=body, headers={**sent, **(headers or {})})
        response = conn.getresponse()
        data = response.read(_MAX_REPLY + 1)
    except (OSError, http.client.HTTPException) as exc:  # ssl.SSLError is an OSError
        raise TransientError(f"registrar {url.host}:{url.port} unreachable: {exc}") from exc
    finally:
        conn.close()
    if len(data) > _MAX_REPLY:
        raise TransientError(f"registrar reply to {path} is larger than {_MAX_REPLY} bytes")
    return response.status, data


def fetch_ca(registrar_url: str, pin: str | None) -> RegistrarInfo:
    """The registrar's info with its CA, checked against `pin` (None only for plain-HTTP test setups)."""
    url = _Url.parse(registrar_url)
    status, data = _request(url, "GET", "/v1/info", None, None)
    if status != 200:
        raise TransientError(f"registrar answered {status} to /v1/info")
    try:
        info = decode(RegistrarInfo, data)
    except ContractError as exc:
        raise TransientError(f"unreadable /v1/info from the registrar: {exc}") from exc
    if url.tls:
        if pin is None:
            raise SettingsError("the join token has no CA pin (mvj_<secret>.<pin>): cannot verify the registrar")
        try:
            got = pin_of(info.ca_pem)
        except ValueError as exc:
            raise EnrollmentRefused(ErrorCode.INVALID_REQUEST.value, f"registrar sent no valid CA: {exc}") from exc
        if got != pin:
            # Not transient: whoever answers at that address is not the registrar the token was made for.
            raise EnrollmentRefused(
                "ca_mismatch",
                f"the registrar at {registrar_url} presented a CA that does not match the join token's pin "
                f"(got {got[:12]}..., want {pin[:12]}...): wrong address, wrong token, or someone in between",
            )
    return info


def reflect(registrar_url: str, *, ca_pem: str | None, timeout: float) -> str:
    """The address the registrar sees this request come from (GET /v1/reflect), over TLS verified against the
    mesh's CA `ca_pem` (required for https). TransientError if it cannot be asked or answers nonsense."""
    url = _Url.parse(registrar_url)
    if url.tls and not ca_pem:
        raise TransientError("no mesh CA to verify the registrar with")
    try:
        status, data = _request(url, "GET", "/v1/reflect", None, ca_pem, timeout=timeout)
    except (ValueError, ssl.SSLError) as exc:  # an unreadable CA
        raise TransientError(f"cannot ask the registrar: {exc}") from exc
    if status != 200:
        raise TransientError(f"registrar answered {status} to /v1/reflect")
    try:
        return decode(Reflection, data).address
    except ContractError as exc:
        raise TransientError(f"unreadable /v1/reflect from the registrar: {exc}") from exc


def enroll_once(
    settings: AgentSettings,
    identity: Identity,
    *,
    token: str,
    password: str,
    store: StateStore,
    endpoints: Sequence[Endpoint] = (),
) -> tuple[Enrollment, Registration]:
    """One enrollment attempt. EnrollmentRefused for a refusal, TransientError for anything worth retrying."""
    registrar_url = settings.registrar_url
    if not registrar_url:
        raise SettingsError("this node is not enrolled yet: give --registrar https://HOST:PORT and --join-token")
    parsed = jointoken.parse(token)
    info = fetch_ca(registrar_url, parsed.pin)
    if info.mesh != settings.mesh:
        raise SettingsError(f"the registrar serves mesh {info.mesh!r}, this agent is configured for {settings.mesh!r}")
    request = EnrollRequest(
        node_id=identity.node_id,
        name=identity.name,
        public_key=identity.public_key,
        endpoints=list(endpoints),
        listen_port=settings.listen_port,
        token=parsed.secret,
        password=password,
    )
    url = _Url.parse(registrar_url)
    status, data = _request(url, "POST", "/v1/enroll", request.model_dump_json().encode(), info.ca_pem)
    try:
        reply = decode(EnrollReply, data)
    except ContractError as exc:
        raise TransientError(f"registrar answered {status} with an unreadable enrollment reply: {exc}") from exc
    verdict = policy.judge_enrollment(status, reply)
    if verdict.action == "fatal":
        raise EnrollmentRefused(verdict.code or "refused", verdict.reason)
    if verdict.action == "retry":
        raise TransientError(verdict.reason)
    if reply.mesh_ip is None or reply.prefix_len is None or reply.settings is None or not reply.signing_key:
        raise TransientError(f"incomplete enrollment reply: {reply}")
    enrollment = Enrollment(
        mesh=info.mesh,
        node_id=identity.node_id,
        registrar_url=registrar_url,
        broker_url=reply.broker_url or info.broker_url,
        signing_key=reply.signing_key,
        ca_pin=pin_of(info.ca_pem),
    )
    store.save_enrollment(enrollment, info.ca_pem)
    registration = Registration(mesh_ip=reply.mesh_ip, prefix_len=reply.prefix_len, settings=reply.settings)
    store.save_registration(registration)
    return enrollment, registration


class Waiter(Protocol):
    """Something to sleep on that wakes early when the agent is asked to stop (threading.Event, StopSignals)."""

    def wait(self, timeout: float | None = None) -> bool: ...


def enroll(
    settings: AgentSettings,
    identity: Identity,
    *,
    store: StateStore,
    stop: Waiter,
    endpoints: Sequence[Endpoint] = (),
) -> Enrollment | None:
    """Enroll, advertising `endpoints`, retrying transient failures with backoff until `stop.wait` says stop
    (then None).

    EnrollmentRefused (the registrar said no), SettingsError (nothing to enroll with) end it.
    """
    if not settings.join_token:
        raise SettingsError("this node is not enrolled yet and has no join token (--join-token)")
    password = store.own_broker_password()
    attempt = 0
    while True:
        try:
            enrollment, registration = enroll_once(
                settings, identity, token=settings.join_token, password=password, store=store, endpoints=endpoints
            )
        except TransientError as exc:
            delay = policy.backoff_delay(attempt, base=1.0, cap=policy.RECONNECT_CAP_UNREGISTERED_S)
            attempt += 1
            log.warning("enrollment: %s; retrying in %.1fs", exc, delay, extra=identity.log_fields())
            if stop.wait(delay):
                return None
            continue
        log.info(
            "enrolled in mesh %s as %s/%s",
            enrollment.mesh,
            registration.mesh_ip,
            registration.prefix_len,
            extra={**identity.log_fields(registration.mesh_ip), "event": "enrolled"},
        )
        return enrollment
