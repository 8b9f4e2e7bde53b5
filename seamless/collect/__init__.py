"""Choose, freeze and checkpoint process trees (CRIU over its RPC protocol)."""
