"""meshlab: a mesh of real node agents in network namespaces on one Linux host, with failure injection."""
