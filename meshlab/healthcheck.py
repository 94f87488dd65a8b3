"""`python -m meshlab.healthcheck URL`: GET a JSON health endpoint and print its body, from inside a namespace.

The registrar's HTTP API listens on the lab's underlay, which only the lab's namespaces reach, so the lab runs
this with `ip netns exec` in the control namespace. Standard library only, so it starts fast. Exit 0 with the
JSON body on stdout; exit 1 with the reason on stderr when nothing answers or the answer is not JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request


def fetch(url: str, *, timeout: float) -> dict:
    """The JSON object `url` answers with; OSError or ValueError if there is none."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
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
    args = parser.parse_args(argv)
    try:
        body = fetch(args.url, timeout=args.timeout)
    except (OSError, ValueError) as exc:
        print(f"healthcheck: {args.url}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(body))
    return 0


if __name__ == "__main__":
    sys.exit(main())
