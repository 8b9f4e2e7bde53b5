"""Validate, load (kexec_file_load) and enter the target kernel."""
