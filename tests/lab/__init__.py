"""Test and demo labs: network namespaces (and, in nm.py, a real NetworkManager)."""
