; memscan.asm - checks that the RAM a VMM hands to a guest reads as zero.
;
; Walks the memory map from hvm_start_info. For every RAM range (type 1) it takes the
; part at or above 1 MiB and outside the guest's own image [0x100000, _end), and
; below 4 GiB (paging is off), and compares it against zero with `repe scasd`
; (one string instruction per range: cheap even where every instruction is emulated).
; The command line token `scanmb=N` caps the amount checked at N MiB (default: all).
;
; Prints exactly one of:
;   memscan: <X> KiB checked, all zero
;   memscan: <X> KiB checked, nonzero at 0x........
; where X counts the bytes compared before the first nonzero dword (rounded down to KiB),
; then resets. A VMM that lets one guest see another's (or its own previous) memory
; fails this test.

%include "pvh.inc"

ONE_MIB equ 0x100000

section .bss
limit:      resd 1                  ; bytes still allowed to be checked (0xFFFFFFFF: no cap)
checked:    resd 1                  ; bytes checked so far
image_end:  resd 1                  ; _end rounded up to 4 KiB: first byte we may scan

section .rodata
key_scanmb: db "scanmb=", 0

section .text
main:
    ; scanmb=N -> limit = N MiB; absent (or >= 4096) -> no cap.
    mov esi, key_scanmb
    mov eax, 0xFFFFFFFF
    call cmdline_get_uint
    cmp eax, 4096
    jae .no_cap
    shl eax, 20
    jmp .set_limit
.no_cap:
    mov eax, 0xFFFFFFFF
.set_limit:
    mov [limit], eax

    mov eax, _end
    add eax, 0xFFF
    and eax, ~0xFFF
    mov [image_end], eax

    mov ebx, memmap_buf             ; EBX walks the copied memory map
    mov ebp, [memmap_count]
.entry:
    test ebp, ebp
    jz .all_zero
    dec ebp
    cmp dword [ebx + ME_TYPE], MEMMAP_TYPE_RAM
    jne .next
    cmp dword [ebx + ME_ADDR + 4], 0
    jne .next                       ; starts above 4 GiB: out of reach without paging

    ; EDI = start, EDX = end (exclusive), clipped to 4 GiB.
    mov edi, [ebx + ME_ADDR]
    mov eax, [ebx + ME_ADDR]
    mov edx, [ebx + ME_ADDR + 4]
    add eax, [ebx + ME_SIZE]
    adc edx, [ebx + ME_SIZE + 4]
    jz .end_ok                      ; end fits in 32 bits (high half zero)
    mov eax, 0xFFFFF000             ; clip at 4 GiB (last page left out)
.end_ok:
    mov edx, eax

    ; Never below 1 MiB, never our own image.
    cmp edi, ONE_MIB
    jae .above_1m
    mov edi, ONE_MIB
.above_1m:
    cmp edi, [image_end]
    jae .outside_image
    mov edi, [image_end]            ; the image starts at 1 MiB, so skip up to its end
.outside_image:
    add edi, 3                      ; whole dwords only
    and edi, ~3
    and edx, ~3
    cmp edi, edx
    jae .next

    ; Length, capped by what scanmb= still allows.
    mov ecx, edx
    sub ecx, edi
    cmp ecx, [limit]
    jbe .len_ok
    mov ecx, [limit]
.len_ok:
    sub [limit], ecx
    mov esi, edi                    ; ESI = start of this block
    shr ecx, 2
    jz .next
    xor eax, eax
    repe scasd                      ; stops after the first nonzero dword
    jne .nonzero
    sub edi, esi                    ; all of it was zero
    add [checked], edi
.next:
    add ebx, ME_ENTRY_SIZE
    cmp dword [limit], 0
    je .all_zero                    ; cap reached
    jmp .entry

.nonzero:
    sub edi, 4                      ; EDI pointed past the offending dword
    mov edx, edi
    sub edi, esi
    add [checked], edi
    PRINT "memscan: "
    mov eax, [checked]
    shr eax, 10
    call serial_put_dec
    PRINT " KiB checked, nonzero at "
    mov eax, edx
    call serial_put_hex32
    call serial_newline
    ret

.all_zero:
    PRINT "memscan: "
    mov eax, [checked]
    shr eax, 10
    call serial_put_dec
    PRINTLN " KiB checked, all zero"
    ret
