; reset.asm - ends through the i8042 reset line.
;
; Prints:
;   reset: requesting reset via i8042
; then writes 0xFE (pulse reset) to the i8042 command port 0x64. A VMM with an i8042
; resets (or stops) the VM there. If the write returns (no i8042, as in QEMU microvm)
; the guest triple-faults instead.

%include "pvh.inc"

section .text
main:
    PRINTLN "reset: requesting reset via i8042"
    jmp guest_reset                 ; out 0x64, 0xFE; then the triple-fault fallback
