; hello.asm - the smallest guest: proves PVH entry, COM1 output and start_info.
;
; Prints:
;   Hello from isovisor guest
;   cmdline: <the kernel command line, as given in hvm_start_info>
; then resets (i8042, then triple fault).

%include "pvh.inc"

section .text
main:
    PRINTLN "Hello from isovisor guest"
    PRINT "cmdline: "
    mov esi, cmdline_buf
    call serial_puts
    call serial_newline
    ret
