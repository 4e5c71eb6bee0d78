; xsave_guest.asm - a hostile-to-the-emulator guest: executes XSAVE in kernel mode.
;
; On hosts whose KVM runs guest kernel code in its instruction emulator (PVM), XSAVE is
; not emulable: isovisor must stop the VM with an emulation error naming RIP and the
; instruction bytes. On hardware-virtualization hosts the instruction simply runs and the
; guest resets.

%include "pvh.inc"

section .text
main:
    PRINTLN "xsave: executing xsave in ring 0"
    mov eax, cr4
    or eax, 1 << 18                 ; CR4.OSXSAVE
    mov cr4, eax
    xor edx, edx
    mov eax, 1                      ; x87 state only
    mov edi, xsave_area
    xsave [edi]
    PRINTLN "xsave: done"
    ret

section .bss
alignb 64
xsave_area: resb 4096
