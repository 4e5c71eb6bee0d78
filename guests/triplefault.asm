; triplefault.asm - ends with a triple fault, never touching the i8042.
;
; Prints:
;   triplefault: loading an empty IDT
; then loads an IDT with limit 0 and executes ud2: #UD cannot be delivered, which
; raises #GP, which cannot be delivered either (#DF), which cannot be delivered:
; the vCPU shuts down (KVM_EXIT_SHUTDOWN).

%include "pvh.inc"

section .text
main:
    PRINTLN "triplefault: loading an empty IDT"
    jmp triple_fault
