; echo.asm - serial input: reads one line from COM1 and prints it back.
;
; pvh.inc has already initialised the UART (FIFOs enabled and cleared, 8N1, no UART
; interrupts). The guest prints
;   echo: ready
; and only then polls LSR.DR for input: whatever arrives before `ready` may have been
; dropped by the FIFO reset, so a harness must wait for that line before typing.
; It reads bytes until CR or LF (at most 120 are kept; NULs are dropped), then prints
;   echo: <line>
; or, if no line end arrives within a TSC deadline of 2^35 ticks (10-17 s),
;   echo: timeout after <n> bytes
; then resets.

%include "pvh.inc"

LINE_MAX equ 120

section .bss
line_buf:   resb LINE_MAX + 1
line_len:   resd 1

section .text
main:
    PRINTLN "echo: ready"

    mov cl, 35
    call tsc_set_deadline
    mov edi, line_buf
    xor ebx, ebx                    ; EBX = bytes kept so far
.read:
    call serial_getc                ; AL = byte, CF = timeout
    jc .timeout
    cmp al, 13
    je .eol
    cmp al, 10
    je .eol
    test al, al
    jz .read                        ; a NUL would end our string early: drop it
    cmp ebx, LINE_MAX
    jae .read                       ; line too long: keep reading, drop the excess
    mov [edi + ebx], al
    inc ebx
    jmp .read

.eol:
    mov byte [edi + ebx], 0
    PRINT "echo: "
    mov esi, line_buf
    call serial_puts
    call serial_newline
    ret

.timeout:
    PRINT "echo: timeout after "
    mov eax, ebx
    call serial_put_dec
    PRINTLN " bytes"
    ret
