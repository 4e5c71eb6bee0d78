"""Security: RBAC (rbac), the host certificate authority (pki), audit, integrity, surface."""
