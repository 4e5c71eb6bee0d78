"""Compile a Policy to classic BPF with libseccomp (through pyseccomp), once per zygote."""

from __future__ import annotations

import os

import pyseccomp as sc  # type: ignore[import-untyped]

from isovisor.worker.seccomp.policy import Policy


def _filter(policy: Policy) -> sc.SyscallFilter:
    f = sc.SyscallFilter(sc.KILL_PROCESS)
    f.set_attr(sc.Attr.ACT_BADARCH, sc.KILL_PROCESS)  # i386 / x32 entry points: kill
    f.set_attr(sc.Attr.CTL_NNP, 0)  # the jail sets no_new_privs itself, earlier
    for rule in policy.rules:
        nr = sc.resolve_syscall(sc.Arch.NATIVE, rule.syscall)
        if nr < 0:
            raise ValueError(f"{policy.name}: unknown syscall {rule.syscall}")
        args = [sc.Arg(i, sc.MASKED_EQ, mask, value) for i, mask, value in rule.conditions]
        f.add_rule(sc.ALLOW, nr, *args)
    for name in policy.enosys:
        f.add_rule(sc.ERRNO(38), sc.resolve_syscall(sc.Arch.NATIVE, name))
    return f


def _export(f: sc.SyscallFilter, pfc: bool) -> bytes:
    fd = os.memfd_create("isovisor-seccomp", os.MFD_CLOEXEC)
    try:
        with os.fdopen(os.dup(fd), "wb") as out:
            (f.export_pfc if pfc else f.export_bpf)(out)
        os.lseek(fd, 0, os.SEEK_SET)
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def compile_bpf(policy: Policy) -> bytes:
    """The policy as an array of struct sock_filter (8 bytes each)."""
    prog = _export(_filter(policy), pfc=False)
    if not prog or len(prog) % 8:
        raise ValueError(f"{policy.name}: libseccomp produced {len(prog)} bytes of BPF")
    return prog


def describe(policy: Policy) -> str:
    """libseccomp's pseudo-filter-code listing (for docs and reviews)."""
    return _export(_filter(policy), pfc=True).decode()


def syscall_name(number: int) -> str:
    try:
        return str(sc.resolve_syscall(sc.Arch.X86_64, number).decode())
    except ValueError:
        return f"syscall {number}"
