"""Adapters: the only modules that touch the kernel or NetworkManager."""
