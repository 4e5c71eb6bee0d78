"""isovisor: a security-first hypervisor system for multi-tenant hosts, on Linux KVM."""

__version__ = "0.1.0"
