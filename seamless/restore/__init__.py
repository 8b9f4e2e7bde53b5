"""Bring the checkpointed process trees back in the new kernel, and report."""
