; cpuid.asm - reports what the CPUID instruction tells this guest.
;
; Prints, one `cpuid: key=value` line each (hex values as 0x + 8 lowercase digits):
;   cpuid: vendor=<12-character vendor string from leaf 0>
;   cpuid: max_leaf=0x........        (leaf 0 EAX)
;   cpuid: leaf1_eax=0x........
;   cpuid: leaf1_ebx=0x........
;   cpuid: leaf1_ecx=0x........
;   cpuid: leaf1_edx=0x........
;   cpuid: hypervisor=<0|1>           (leaf 1 ECX bit 31)
; and only when the hypervisor bit is set:
;   cpuid: hv_max_leaf=0x........     (leaf 0x40000000 EAX)
;   cpuid: hv_signature=<leaf 0x40000000 EBX,ECX,EDX as text, up to the first NUL>
; then resets.

%include "pvh.inc"

section .bss
sig_buf:    resb 16                 ; 12 signature bytes + NUL (+ padding)

section .text
main:
    ; Leaf 0: maximum basic leaf in EAX, vendor string in EBX, EDX, ECX (that order).
    xor eax, eax
    xor ecx, ecx
    cpuid
    mov [sig_buf], ebx
    mov [sig_buf + 4], edx
    mov [sig_buf + 8], ecx
    mov byte [sig_buf + 12], 0
    PRINT "cpuid: vendor="
    mov esi, sig_buf
    call serial_puts
    call serial_newline
    PRINT "cpuid: max_leaf="
    call serial_put_hex32
    call serial_newline

    ; Leaf 1: family/model/stepping, APIC id, feature flags.
    mov eax, 1
    xor ecx, ecx
    cpuid
    PRINT "cpuid: leaf1_eax="
    call serial_put_hex32
    call serial_newline
    mov eax, ebx
    PRINT "cpuid: leaf1_ebx="
    call serial_put_hex32
    call serial_newline
    mov eax, ecx
    PRINT "cpuid: leaf1_ecx="
    call serial_put_hex32
    call serial_newline
    mov eax, edx
    PRINT "cpuid: leaf1_edx="
    call serial_put_hex32
    call serial_newline

    ; The hypervisor-present bit: ECX bit 31.
    PRINT "cpuid: hypervisor="
    mov eax, ecx
    shr eax, 31
    call serial_put_dec
    call serial_newline
    test eax, eax
    jz .done

    ; Leaf 0x40000000: the hypervisor's maximum leaf and signature (EBX, ECX, EDX).
    mov eax, 0x40000000
    xor ecx, ecx
    cpuid
    mov [sig_buf], ebx
    mov [sig_buf + 4], ecx
    mov [sig_buf + 8], edx
    mov byte [sig_buf + 12], 0
    PRINT "cpuid: hv_max_leaf="
    call serial_put_hex32
    call serial_newline
    PRINT "cpuid: hv_signature="
    mov esi, sig_buf
    call serial_puts                ; stops at the first NUL ("KVMKVMKVM\0\0\0")
    call serial_newline
.done:
    ret
