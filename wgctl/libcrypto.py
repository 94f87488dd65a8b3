"""X25519 and Ed25519 through the OpenSSL libcrypto that Python's `ssl` module has loaded already (ctypes).

Why not the `cryptography` package: the agent needs two primitives, an X25519 public key derived from a private
one (its WireGuard identity) and an Ed25519 signature check (the registrar's signed membership and replies), and
`cryptography` costs ~7 MiB of resident memory per agent for them (one Rust extension with its own OpenSSL;
docs/benchmarks.md, "agent footprint"), while every process that speaks TLS has libcrypto mapped already. The
registrar, which signs, keeps `cryptography`; tests/unit/test_libcrypto.py checks this module against it on
random keys, messages and broken signatures, so a wrong binding fails there and not in a running mesh.

The raw-key EVP functions appeared in OpenSSL 1.1.1; with an older libcrypto the first call raises
LibcryptoError saying so (the agent makes that call at start, `require()`). Every EVP object is freed in the
call that made it, and OpenSSL's per-thread error queue is emptied after every failure, so that a refused
signature leaves nothing behind for the next TLS call on the same thread to misread.
"""

from __future__ import annotations

import _ssl
import ctypes
import functools
import ssl
from dataclasses import dataclass

from wgctl.errors import WireGuardError

# OpenSSL's NIDs (obj_mac.h), stable across versions.
NID_X25519 = 1034
NID_ED25519 = 1087
KEY_LEN = 32
ED25519_SIG_LEN = 64

# Tried in order: the libcrypto `_ssl` links (dlsym on a handle also searches the object's dependencies), then
# the usual sonames for a Python whose `_ssl` is built in or linked statically.
_SONAMES = ("libcrypto.so.3", "libcrypto.so.1.1")


class LibcryptoError(WireGuardError):
    """libcrypto is missing a function this module needs, or one of its calls failed."""


@dataclass(frozen=True)
class _Bindings:
    new_raw_private_key: ctypes._CFuncPtr
    new_raw_public_key: ctypes._CFuncPtr
    get_raw_public_key: ctypes._CFuncPtr
    pkey_free: ctypes._CFuncPtr
    md_ctx_new: ctypes._CFuncPtr
    md_ctx_free: ctypes._CFuncPtr
    digest_verify_init: ctypes._CFuncPtr
    digest_verify: ctypes._CFuncPtr
    err_get_error: ctypes._CFuncPtr
    err_error_string_n: ctypes._CFuncPtr
    err_clear_error: ctypes._CFuncPtr
    source: str


# name in libcrypto -> (field, restype, argtypes). Pointers are c_void_p both ways: ctypes' default restype is
# a C int, which would cut a 64-bit pointer in half.
_SIGNATURES = {
    "EVP_PKEY_new_raw_private_key": (
        "new_raw_private_key", ctypes.c_void_p, (ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t),
    ),
    "EVP_PKEY_new_raw_public_key": (
        "new_raw_public_key", ctypes.c_void_p, (ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t),
    ),
    "EVP_PKEY_get_raw_public_key": (
        "get_raw_public_key", ctypes.c_int, (ctypes.c_void_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_size_t)),
    ),
    "EVP_PKEY_free": ("pkey_free", None, (ctypes.c_void_p,)),
    "EVP_MD_CTX_new": ("md_ctx_new", ctypes.c_void_p, ()),
    "EVP_MD_CTX_free": ("md_ctx_free", None, (ctypes.c_void_p,)),
    "EVP_DigestVerifyInit": (
        "digest_verify_init", ctypes.c_int,
        (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p),
    ),
    "EVP_DigestVerify": (
        "digest_verify", ctypes.c_int,
        (ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_size_t),
    ),
    "ERR_get_error": ("err_get_error", ctypes.c_ulong, ()),
    "ERR_error_string_n": ("err_error_string_n", None, (ctypes.c_ulong, ctypes.c_char_p, ctypes.c_size_t)),
    "ERR_clear_error": ("err_clear_error", None, ()),
}


def _bind(lib: ctypes.CDLL, source: str) -> _Bindings:
    """The functions of `lib`; AttributeError naming the first one it lacks."""
    fields: dict[str, object] = {"source": source}
    for name, (field, restype, argtypes) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype = restype
        fn.argtypes = argtypes
        fields[field] = fn
    return _Bindings(**fields)


@functools.cache
def _lib() -> _Bindings:
    return _load([name for name in (getattr(_ssl, "__file__", None), *_SONAMES) if name])


def _load(candidates: list[str]) -> _Bindings:
    """The functions of the first of `candidates` (library paths or sonames) that has them all."""
    attempts: list[str] = []
    for candidate in candidates:
        try:
            return _bind(ctypes.CDLL(candidate), candidate)
        except OSError as exc:
            attempts.append(f"{candidate}: {exc}")
        except AttributeError as exc:
            attempts.append(f"{candidate}: lacks {exc}")
    raise LibcryptoError(
        "X25519 and Ed25519 need OpenSSL >= 1.1.1 (its raw-key EVP functions); Python's ssl module uses "
        f"{ssl.OPENSSL_VERSION}, and no libcrypto found has them: " + "; ".join(attempts)
    )


def require() -> str:
    """Load libcrypto's functions now (LibcryptoError if they are missing) and return which file has them."""
    return _lib().source


def _failure(lib: _Bindings, what: str) -> LibcryptoError:
    """A LibcryptoError for `what` with OpenSSL's first queued reason, leaving the queue empty."""
    code = lib.err_get_error()
    reason = "no reason queued"
    if code:
        buf = ctypes.create_string_buffer(256)
        lib.err_error_string_n(code, buf, len(buf))
        reason = buf.value.decode("ascii", "replace")
    lib.err_clear_error()
    return LibcryptoError(f"{what}: {reason}")


def x25519_public_key(private_key: bytes) -> bytes:
    """The 32-byte X25519 public key of a 32-byte private key (clamped on use, as RFC 7748 says)."""
    if len(private_key) != KEY_LEN:
        raise LibcryptoError(f"an X25519 private key is {KEY_LEN} bytes, got {len(private_key)}")
    lib = _lib()
    pkey = lib.new_raw_private_key(NID_X25519, None, private_key, KEY_LEN)
    if not pkey:
        raise _failure(lib, "EVP_PKEY_new_raw_private_key(X25519)")
    try:
        out = ctypes.create_string_buffer(KEY_LEN)
        size = ctypes.c_size_t(KEY_LEN)
        if lib.get_raw_public_key(pkey, out, ctypes.byref(size)) != 1:
            raise _failure(lib, "EVP_PKEY_get_raw_public_key(X25519)")
        if size.value != KEY_LEN:
            raise LibcryptoError(f"EVP_PKEY_get_raw_public_key(X25519) gave {size.value} bytes, not {KEY_LEN}")
        return out.raw
    finally:
        lib.pkey_free(pkey)


def ed25519_verify(public_key: bytes, signature: bytes, message: bytes) -> bool:
    """True if `signature` is `public_key`'s Ed25519 signature over `message`, False if not.

    A signature of the wrong length, a public key that is no curve point and a tampered message are all just
    False; LibcryptoError only for a public key of the wrong length or a failure of libcrypto itself.
    """
    if len(public_key) != KEY_LEN:
        raise LibcryptoError(f"an Ed25519 public key is {KEY_LEN} bytes, got {len(public_key)}")
    if len(signature) != ED25519_SIG_LEN:
        return False
    lib = _lib()
    pkey = lib.new_raw_public_key(NID_ED25519, None, public_key, KEY_LEN)
    if not pkey:
        raise _failure(lib, "EVP_PKEY_new_raw_public_key(Ed25519)")
    ctx = None
    try:
        ctx = lib.md_ctx_new()
        if not ctx:
            raise _failure(lib, "EVP_MD_CTX_new")
        # Ed25519 hashes internally (PureEdDSA): no digest is given, and the message goes in in one piece.
        if lib.digest_verify_init(ctx, None, None, None, pkey) != 1:
            raise _failure(lib, "EVP_DigestVerifyInit(Ed25519)")
        result = lib.digest_verify(ctx, signature, ED25519_SIG_LEN, message, len(message))
        if result == 1:
            return True
        # 0 is a bad signature; OpenSSL 3 returns a negative value (and queues a reason) for a public key
        # that decodes to no point, which is a bad signature too. Either way the queue is emptied.
        lib.err_clear_error()
        return False
    finally:
        if ctx:
            lib.md_ctx_free(ctx)
        lib.pkey_free(pkey)
