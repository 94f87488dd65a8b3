"""wgctl: a WireGuard control layer that knows nothing of meshes.

`wgctl.model` holds the types and the backend interfaces, `wgctl.diff` the pure plan from actual to desired
peers, `wgctl.keys` key handling, `wgctl.memory` in-memory backends for tests.
"""
