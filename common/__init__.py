"""Dependency-free pieces every layer may use: crash-consistent writes, normalisation constants, user errors."""
