"""`python -m meshlab.registrarapi`: read and administer the registrar's HTTP API from inside a namespace.

The API listens on the lab's underlay, which only the lab's namespaces reach, so the lab runs this with
`ip netns exec` in the control namespace (as it runs meshlab.healthcheck). Standard library only, so it starts
fast. `get URL...` prints a JSON list with each URL's JSON body, in order (null for one that did not answer):
one process for a whole look at the registrar. `delete URL --token-file F` sends an admin DELETE and prints the
HTTP status; 404 counts as done (the thing is already gone).
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request


def get(url: str, *, timeout: float) -> object:
    """The JSON body `url` answers with; OSError or ValueError if there is none."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


def delete(url: str, *, token: str, timeout: float) -> int:
    """Send DELETE with the admin token; the HTTP status (404 included). OSError if nothing answered."""
    request = urllib.request.Request(url, method="DELETE", headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m meshlab.registrarapi")
    parser.add_argument("--timeout", type=float, default=2.0)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_get = sub.add_parser("get")
    p_get.add_argument("urls", nargs="+")
    p_del = sub.add_parser("delete")
    p_del.add_argument("url")
    p_del.add_argument("--token-file", required=True)
    args = parser.parse_args(argv)
    if args.cmd == "get":
        out: list[object] = []
        for url in args.urls:
            try:
                out.append(get(url, timeout=args.timeout))
            except (OSError, ValueError) as exc:
                print(f"registrarapi: {url}: {exc}", file=sys.stderr)
                out.append(None)
        print(json.dumps(out))
        return 0
    with open(args.token_file) as handle:
        token = handle.read().strip()
    try:
        status = delete(args.url, token=token, timeout=args.timeout)
    except OSError as exc:
        print(f"registrarapi: {args.url}: {exc}", file=sys.stderr)
        return 1
    print(status)
    return 0 if status in (200, 204, 404) else 1


if __name__ == "__main__":
    sys.exit(main())
