"""Fuzz harnesses for every guest- and client-reachable parser (see fuzz/README.md)."""
