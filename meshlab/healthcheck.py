"""`python -m meshlab.healthcheck URL [--cafile CA]`: GET a JSON health endpoint and print its body.

The registrar's HTTP API listens on the lab's underlay, which only the lab's namespaces reach, so the lab runs
this with `ip netns exec` in the control namespace. It speaks HTTPS verified against the mesh's CA (the
registrar's own; no host name check, as agents do). Standard library only, so it starts fast. Exit 0 with the
JSON body on stdout; exit 1 with the reason on stderr when nothing answers or the answer is not JSON.
"""

from __future__ import annotations

import argparse
import json
import ssl
import sys
import urllib.error
import urllib.request


def fetch(url: str, *, timeout: float, cafile: str | None = None) -> dict:
    """The JSON object `url` answers with; OSError or ValueError if there is none."""
    context = None
    if cafile is not None:
        context = ssl.create_default_context(cafile=cafile)
        context.check_hostname = False
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as response:
            body = json.loads(response.read())
    except urllib.error.HTTPError as exc:  # an answer, but not 2xx: still report the body if it is JSON
        body = json.loads(exc.read() or b"null")
    if not isinstance(body, dict):
        raise ValueError(f"{url} answered {body!r}, not a JSON object")
    return body


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m meshlab.healthcheck")
    parser.add_argument("url")
    parser.add_argument("--timeout", type=float, default=2.0)
    parser.add_argument("--cafile", help="the CA to verify an https URL against")
    args = parser.parse_args(argv)
    try:
        body = fetch(args.url, timeout=args.timeout, cafile=args.cafile)
    except (OSError, ValueError) as exc:
        print(f"healthcheck: {args.url}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(body))
    return 0


if __name__ == "__main__":
    sys.exit(main())
