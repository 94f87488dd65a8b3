"""The nftables ruleset that makes a node's underlay faults: blocked addresses and random loss. No I/O here.

A lab has no netem, so loss is `numgen random mod 100 < P drop` (each packet dropped with probability P %),
and a cut is a plain drop of traffic to and from the blocked addresses. Everything lives in one table of the
node's own namespace, replaced as a whole on every change (so undoing one fault keeps the others), and gone
with the namespace when the lab goes down. ARP is not in the inet family: a cut node still resolves
neighbours, as a node behind a broken router would.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping

from meshlab.state import UnderlayRule

TABLE = "meshlab"
FAMILY = "inet"


def _addresses(items: list[str]) -> str:
    for item in items:
        ipaddress.ip_network(item, strict=False)  # ValueError for anything that is not an address or CIDR
    return "{ " + ", ".join(sorted(set(items))) + " }"


def _rule_lines(rule: UnderlayRule, *, ifname: str, direction: str) -> list[str]:
    iface = f'{"iifname" if direction == "in" else "oifname"} "{ifname}"'
    field = "saddr" if direction == "in" else "daddr"
    lines = []
    if rule.block:
        match = f"ip {field} {_addresses(rule.block)}"
        if rule.allow:
            match += f" ip {field} != {_addresses(rule.allow)}"
        lines.append(f"{iface} {match} drop")
    if rule.loss_percent:
        lines.append(f"{iface} numgen random mod 100 < {rule.loss_percent} drop")
    return lines


def render(rules: Mapping[str, UnderlayRule], *, ifname: str) -> str:
    """The `nft -f` script that replaces the lab's table with `rules` (by fault tag); removes it if empty.

    `add table` first makes the `delete` that follows succeed whether or not the table existed: the script is
    idempotent, which `down` and a crashed chaos run rely on.
    """
    script = [f"add table {FAMILY} {TABLE}", f"delete table {FAMILY} {TABLE}"]
    if not any(r.block or r.loss_percent for r in rules.values()):
        return "\n".join(script) + "\n"
    chains = []
    for chain, hook, direction in (("underlay_in", "input", "in"), ("underlay_out", "output", "out")):
        body = [f"    chain {chain} {{", f"        type filter hook {hook} priority 0; policy accept;"]
        for tag in sorted(rules):
            body += [f"        {line}  # {tag}" for line in _rule_lines(rules[tag], ifname=ifname, direction=direction)]
        body.append("    }")
        chains += body
    script += [f"table {FAMILY} {TABLE} {{", *chains, "}"]
    return "\n".join(script) + "\n"
