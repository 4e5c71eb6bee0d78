"""The jailed per-VM worker: one process per VM, started from a zygote, locked down
(namespaces, pivot_root, own uid/gid, no capabilities, no_new_privs, rlimits, cgroups,
seccomp per thread role) before any guest code runs. See docs/WORKER.md."""
