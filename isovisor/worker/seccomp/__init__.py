"""seccomp-bpf for workers: a process-wide base filter plus one filter per thread role
(vcpu, device-io, control), compiled with libseccomp (pyseccomp) once in the zygote and
installed as raw BPF with seccomp(2) in the worker. Every violation is
SECCOMP_RET_KILL_PROCESS."""
