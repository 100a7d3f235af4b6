"""Offline: simulate, corrupt, train, evaluate, fuse, denoise files."""
