; idle_guest.asm - an idle VM for the worker tests and bench/worker_memory.py: prints one
; line, then halts with interrupts off. With the in-kernel irqchip a HLT stays in the
; kernel, so the VM costs no exits and no CPU until the host stops it.

%include "pvh.inc"

section .text
main:
    PRINTLN "idle: ready"
    cli
.halt:
    hlt
    jmp .halt
