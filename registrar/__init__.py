"""The registrar: the control plane of one mesh.

It is the single writer and the only authority on membership, mesh IPs and liveness. Pure cores (ipam,
tokens, membership, engine) hold every decision; store, service, api and cli are the I/O around them.
"""
