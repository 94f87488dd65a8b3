"""Faults beyond a node's own processes and link: underlay cuts and loss, a registrar kill -9, a reinstalled node.

Each fault has its undo, and each is recorded in the state file before or as it takes effect, so another shell
can see and undo it and `down` removes it whatever happened to the process that made it:
- underlay cuts and loss are nftables rules in the node's own namespace (meshlab.netfilter), one set per
  fault tag: a control-plane cut (node <-> broker and registrar, peer paths intact), a group isolated from
  everything outside it, random loss on the node's link. They vanish with the namespace;
- the registrar killed with SIGKILL is started again by `registrar start`;
- a node reinstalled (state dir deleted) comes back as a new key under the same node id, the way an operator
  re-admits a reinstalled machine: admin removal of the old member (its key revoked), then a fresh enrollment.
Everything that talks to the control plane goes through meshlab.controlplane, so it follows the lab when the
control plane's contract changes.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence

from meshlab import system
from meshlab.context import LabContext
from meshlab.controlplane import ControlPlane
from meshlab.netfilter import render
from meshlab.nodes import Nodes
from meshlab.plan import UNDERLAY_IF
from meshlab.state import UnderlayRule

CONTROL_CUT = "control"
ISOLATED = "isolate"
LOSS = "loss"


class Faults:
    """Injects and undoes the faults above on a lab."""

    def __init__(self, ctx: LabContext, *, control: ControlPlane, nodes: Nodes) -> None:
        self.ctx = ctx
        self.store = ctx.store
        self.control = control
        self.nodes = nodes

    # --- underlay ------------------------------------------------------------------------------------------

    def cut_control(self, name: str) -> None:
        """Drop the node's traffic to and from the control plane (broker, registrar); peers still reach it."""
        self._set(name, CONTROL_CUT, UnderlayRule(block=[self.ctx.plan().control_ip]))
        self.ctx.report(f"{name}: cut from the control plane (peer paths intact)")

    def restore_control(self, name: str) -> None:
        """Undo cut_control."""
        self._set(name, CONTROL_CUT, None)
        self.ctx.report(f"{name}: control plane reachable again")

    def isolate(self, names: Sequence[str]) -> None:
        """Split the underlay: `names` reach only each other, not the control plane nor any other node."""
        st = self.ctx.state()
        group = [self.ctx.node(n, st).underlay_ip for n in names]
        subnet = str(self.ctx.plan(st).subnet)
        for name in names:
            self._set(name, ISOLATED, UnderlayRule(block=[subnet], allow=group))
        self.ctx.report(f"{', '.join(names)}: isolated together from the control plane and the other nodes")

    def rejoin(self, names: Sequence[str]) -> None:
        """Undo isolate for `names`."""
        for name in names:
            self._set(name, ISOLATED, None)
        self.ctx.report(f"{', '.join(names)}: underlay whole again")

    def loss(self, name: str, percent: int) -> None:
        """Drop `percent` % of the packets on the node's link, each way, at random (0 removes the loss)."""
        self._set(name, LOSS, UnderlayRule(loss_percent=percent) if percent else None)
        self.ctx.report(f"{name}: {percent} % random loss on its link" if percent else f"{name}: loss removed")

    def clear(self, name: str) -> None:
        """Remove every underlay fault of the node."""
        with self.store.locked():
            st = self.ctx.state()
            record = self.ctx.node(name, st)
            self._apply(record.namespace, {})
            record.underlay = {}
            self.store.save(st)

    def _set(self, name: str, tag: str, rule: UnderlayRule | None) -> None:
        with self.store.locked():
            st = self.ctx.state()
            record = self.ctx.node(name, st)
            rules = dict(record.underlay)
            if rule is None:
                rules.pop(tag, None)
            else:
                rules[tag] = rule
            # Recorded first: if nft fails half-way, the state still names what may be in force.
            record.underlay = rules
            self.store.save(st)
            self._apply(record.namespace, rules)

    @staticmethod
    def _apply(namespace: str, rules: dict[str, UnderlayRule]) -> None:
        system.run(system.ns_argv(namespace, ["nft", "-f", "-"]), input_text=render(rules, ifname=UNDERLAY_IF))

    # --- control plane and reinstall -----------------------------------------------------------------------

    def kill_registrar(self) -> None:
        """kill -9 the registrar (and the embedded broker in it); undone by `Lab.registrar("start")`."""
        self.control.kill_registrar()

    def reinstall(self, name: str, *, wait: bool = False) -> None:
        """The node's machine reinstalled: every process killed, its state dir deleted (new key, no credential),
        the old member removed by an admin (its key revoked), the agent started again: it enrolls anew with the
        join token, under the same node id.

        The registrar never lets a join token re-key an existing node id (docs/registrar.md), so without the
        admin removal the reinstalled node would be refused for good; the removal is part of the procedure.
        """
        record = self.ctx.node(name)
        self.nodes.crash(name)
        shutil.rmtree(self.store.node_dir(name) / "state", ignore_errors=True)
        assert record.node_id is not None
        self.control.forget_member(record.node_id)
        self.nodes.start(name, wait=wait)
        self.ctx.report(f"{name}: reinstalled (state dir deleted, member removed, agent started with a new key)")

    def underlay(self, name: str) -> dict[str, UnderlayRule]:
        """The underlay faults in force on the node, by tag."""
        return dict(self.ctx.node(name).underlay)


def active_rules(namespace: str) -> str:
    """What nftables holds in the node's namespace (for people debugging a run)."""
    return system.run(system.ns_argv(namespace, ["nft", "list", "table", "inet", "meshlab"]), check=False).stdout
