; smp.asm - brings up the application processors (APs) with INIT-SIPI-SIPI.
;
; The command line token `ncpus=N` (default 1) says how many vCPUs the VMM gave us.
; The bootstrap processor (BSP):
;   1. prints `smp: bsp apic=<id>` (initial APIC id from CPUID leaf 1, decimal);
;   2. copies a real-mode trampoline to 0x30000 (outside the VMM's 0x500-0x2ffff);
;   3. software-enables its local APIC (0xFEE00000, reached physically: paging is off)
;      and broadcasts INIT, then SIPI twice with vector 0x30 (start at 0x3000:0000)
;      to all processors but itself;
;   4. waits, bounded by a TSC deadline (2^34 ticks, 4-8 s), for N-1 APs to check in;
;   5. prints `smp: <N> cpus online`, or `smp: timeout, <k> of <N> online` where k
;      counts the BSP, then resets.
; Each AP, in 16-bit real mode, takes a spinlock (xchg, implicitly locked), prints
; `smp: ap apic=<id>`, increments the shared counter, releases the lock and halts
; with interrupts off. AP lines come in whatever order the APs win the lock.

%include "pvh.inc"

TRAMPOLINE      equ 0x30000         ; physical address of the AP trampoline
SIPI_VECTOR     equ TRAMPOLINE >> 12 ; 0x30: the AP starts at CS=0x3000, IP=0

LAPIC           equ 0xFEE00000
LAPIC_SVR       equ LAPIC + 0x0F0   ; spurious-interrupt vector register (bit 8: enable)
LAPIC_ICR_LO    equ LAPIC + 0x300   ; interrupt command register, low half (sends)
LAPIC_ICR_HI    equ LAPIC + 0x310   ; destination (unused with a shorthand)
ICR_PENDING     equ 1 << 12         ; delivery status: send pending
ICR_INIT        equ 0x000C4500      ; all-excluding-self, level assert, INIT
ICR_SIPI        equ 0x000C4600 | SIPI_VECTOR ; all-excluding-self, STARTUP

; Offsets of the shared variables inside the trampoline (real-mode DS = 0x3000).
%define T(x) ((x) - tramp_start)

section .bss
ncpus:      resd 1

section .rodata
key_ncpus:  db "ncpus=", 0

section .text
main:
    mov esi, key_ncpus
    mov eax, 1
    call cmdline_get_uint
    cmp eax, 1
    jae .ncpus_ok
    mov eax, 1                      ; ncpus=0 makes no sense: we are one
.ncpus_ok:
    cmp eax, 255
    jbe .ncpus_set
    mov eax, 255                    ; xAPIC broadcast reaches at most 255 CPUs
.ncpus_set:
    mov [ncpus], eax

    ; Our APIC id: CPUID leaf 1, EBX bits 31..24.
    mov eax, 1
    xor ecx, ecx
    cpuid
    shr ebx, 24
    PRINT "smp: bsp apic="
    mov eax, ebx
    call serial_put_dec
    call serial_newline

    cmp dword [ncpus], 1
    je .report                      ; nothing to start

    ; Copy the trampoline (code, lock, counter, stack) to 0x30000. Its shared
    ; variables are zero in the image, so the copy starts them at zero.
    mov esi, tramp_start
    mov edi, TRAMPOLINE
    mov ecx, tramp_end - tramp_start
    rep movsb

    ; Software-enable the local APIC (spurious vector 0xFF) so it sends IPIs.
    mov eax, [LAPIC_SVR]
    or eax, 0x1FF
    mov [LAPIC_SVR], eax

    ; INIT to every other processor, then give it ~10 ms (2^25 ticks, on the safe side).
    mov dword [LAPIC_ICR_HI], 0
    mov dword [LAPIC_ICR_LO], ICR_INIT
    call wait_icr_idle
    mov cl, 25
    call tsc_delay

    ; STARTUP twice (the MP protocol), ~200 us apart (2^20 ticks).
    mov dword [LAPIC_ICR_LO], ICR_SIPI
    call wait_icr_idle
    mov cl, 20
    call tsc_delay
    mov dword [LAPIC_ICR_LO], ICR_SIPI
    call wait_icr_idle

    ; Wait for the APs: counter == N-1, or the deadline.
    mov cl, 34
    call tsc_set_deadline
    mov ebx, [ncpus]
    dec ebx
.wait:
    movzx eax, word [TRAMPOLINE + T(tramp_count)]
    cmp eax, ebx
    jae .report
    call tsc_expired
    jc .timeout
    pause
    jmp .wait

.report:
    call take_lock                  ; late APs may still be printing
    PRINT "smp: "
    mov eax, [ncpus]
    call serial_put_dec
    PRINTLN " cpus online"
    call drop_lock
    ret

.timeout:
    call take_lock
    PRINT "smp: timeout, "
    movzx eax, word [TRAMPOLINE + T(tramp_count)]
    inc eax                         ; the BSP is online too
    call serial_put_dec
    PRINT " of "
    mov eax, [ncpus]
    call serial_put_dec
    PRINTLN " online"
    call drop_lock
    ret

; Wait (bounded) until the local APIC has sent the last IPI.
wait_icr_idle:
    push ecx
    mov ecx, 100000
.poll:
    test dword [LAPIC_ICR_LO], ICR_PENDING
    jz .idle
    pause
    loop .poll
.idle:
    pop ecx
    ret

; The spinlock shared with the APs (only meaningful once the trampoline is copied;
; with ncpus=1 nobody else runs, and the lock byte at 0x30000+ is left alone).
take_lock:
    cmp dword [ncpus], 1
    je .done
    push eax
.spin:
    mov al, 1
    xchg al, [TRAMPOLINE + T(tramp_lock)] ; xchg with memory is always locked
    test al, al
    jz .got
    pause
    jmp .spin
.got:
    pop eax
.done:
    ret

drop_lock:
    cmp dword [ncpus], 1
    je .done
    mov byte [TRAMPOLINE + T(tramp_lock)], 0
.done:
    ret

; ---------------------------------------------------------------------------
; The AP trampoline: position-independent 16-bit real-mode code, copied to 0x30000
; and entered at 0x3000:0000 by the SIPI. Data is addressed with DS = CS = 0x3000,
; so offsets are T(label). It lives in .text only as bytes to copy.
bits 16
align 16
tramp_start:
    cli
    cld
    mov ax, cs
    mov ds, ax
    mov ss, ax

    ; Take the lock before touching the (single, shared) stack or the UART.
.spin:
    mov al, 1
    xchg al, [T(tramp_lock)]        ; xchg with memory is always locked
    test al, al
    jz .locked
    pause
    jmp .spin
.locked:
    mov sp, T(tramp_stack_top)

    mov eax, 1                      ; our APIC id: CPUID leaf 1, EBX bits 31..24
    xor ecx, ecx
    cpuid
    shr ebx, 24

    mov si, T(tramp_msg)
    call tramp_puts
    mov ax, bx
    call tramp_put_dec
    mov si, T(tramp_crlf)
    call tramp_puts

    lock inc word [T(tramp_count)]  ; checked in: the BSP may now report
    mov byte [T(tramp_lock)], 0     ; release (a plain store releases on x86)

.halt:
    cli
    hlt
    jmp .halt

; Print the NUL-terminated string at DS:SI.
tramp_puts:
    lodsb
    test al, al
    jz .done
    call tramp_putc
    jmp tramp_puts
.done:
    ret

; Print AL on COM1, waiting (bounded) for THRE.
tramp_putc:
    push cx
    push dx
    push ax
    mov dx, COM1 + UART_LSR
    mov cx, 10000
.wait:
    in al, dx
    test al, LSR_THRE
    jnz .send
    loop .wait
.send:
    pop ax
    mov dx, COM1 + UART_THR
    out dx, al
    pop dx
    pop cx
    ret

; Print AX in decimal.
tramp_put_dec:
    mov bx, 10
    xor cx, cx
.divide:
    xor dx, dx
    div bx
    push dx
    inc cx
    test ax, ax
    jnz .divide
.emit:
    pop ax
    add al, '0'
    call tramp_putc
    loop .emit
    ret

tramp_msg:      db "smp: ap apic=", 0
tramp_crlf:     db 13, 10, 0
align 2
tramp_lock:     db 0                ; 0 free, 1 taken
                db 0
tramp_count:    dw 0                ; APs that have checked in
align 16
                times 256 db 0      ; the APs' one stack, used only under the lock
tramp_stack_top:
tramp_end:
bits 32
