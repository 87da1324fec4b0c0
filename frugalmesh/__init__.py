"""frugalmesh's public Python API for code that plugs into a mesh: ``frugalmesh.agents`` (agent services)."""
