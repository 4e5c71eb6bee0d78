; blk_driver.asm - a minimal virtio-mmio block driver (virtio 1.2 §4.2.3, §5.2), and its
; hostile variants.
;
; Flat binary, 32-bit protected mode, paging off, loaded and entered at 0x100000 by
; tests/vmm/rawguest.py. On this PVM host every guest kernel-mode instruction is emulated
; (~1 us each): descriptor tables and request headers are static data in the image, and
; the loops are short.
;
; Devices: virtio-blk in slot 0 (0xD0000000), virtio-rng in slot 1 (0xD0001000).
; Reports 32-bit values with `out 0x500, eax`:
;   MagicValue, Version, DeviceID, DeviceFeatures[31:0], Status after FEATURES_OK,
;   capacity (config, low 32 bits), QueueNumMax, then
;   HOSTILE=0: for each request (OUT 2 sectors at sector 1, FLUSH, IN the same 2 sectors,
;              GET_ID): its status byte and its used length; then 0 if the data read back
;              equals the data written (else the index of the first differing dword + 1);
;              then the first 4 bytes of the serial.
;   HOSTILE>0: Status once DEVICE_NEEDS_RESET (0x40) shows up, then the rng's used length
;              (the other device still serves), then 0x4C495645 ("LIVE") if the blk
;              transport still answers (MagicValue).
;   and finally ALIVE (0x600DF00D); 0xDEAD0001 instead if a wait timed out.
;
; HOSTILE: 1 a descriptor whose `next` is itself (a loop); 2 a header buffer in the MMIO
; hole (outside RAM); 3 a data buffer of 0xFFFFF000 bytes (huge, past RAM); 4 an available
; ring entry naming descriptor 200 of a 16-entry queue (bad index); 5 a descriptor table
; placed over the device's own MMIO window (rejected at QueueReady); 6 an avail idx that
; jumps 1000 entries ahead.
; Build: nasm -f bin -I <this directory>/ -DHOSTILE=<n> (driver_guests.py).

bits 32
org 0x100000

%ifndef HOSTILE
%define HOSTILE 0
%endif

BLK     equ 0xD0000000
RNG     equ 0xD0001000
REPORT  equ 0x500
AVAIL   equ 0x201000        ; blk available ring
USED    equ 0x202000        ; blk used ring
WBUF    equ 0x204000        ; 1024 bytes written
RBUF    equ 0x205000        ; 1024 bytes read back
IDBUF   equ 0x206000        ; GET_ID
STATUS  equ 0x207000        ; one status byte per request, 16 apart
RDESC   equ 0x208000        ; rng: descriptor table, rings, buffer
RAVAIL  equ 0x209000
RUSED   equ 0x20A000
RBUFR   equ 0x20B000
QSIZE   equ 16
ALIVE   equ 0x600DF00D
TIMEOUT equ 0xDEAD0001
SPINS   equ 400000

%include "report.inc"
%include "virtio_mmio.inc"

start:
    mov esp, 0x1FF000                       ; rawguest gives no stack; calls need one
    mov dx, REPORT
    mov esi, BLK
    SEND [esi + 0x000]
    SEND [esi + 0x004]
    SEND [esi + 0x008]
    mov dword [esi + 0x070], 0              ; §3.1.1: reset, ACKNOWLEDGE, DRIVER
    mov dword [esi + 0x070], 1
    mov dword [esi + 0x070], 3
    mov dword [esi + 0x014], 0
    SEND [esi + 0x010]                      ; DeviceFeatures[31:0]
    mov dword [esi + 0x024], 0
    mov dword [esi + 0x020], 0x244          ; SEG_MAX | BLK_SIZE | FLUSH
    mov dword [esi + 0x024], 1
    mov dword [esi + 0x020], 1              ; VIRTIO_F_VERSION_1
    mov dword [esi + 0x070], 0x0B           ; FEATURES_OK, re-read (§3.1.1 step 6)
    SEND [esi + 0x070]
    SEND [esi + 0x100]                      ; capacity, low half
    mov dword [esi + 0x030], 0
    SEND [esi + 0x034]                      ; QueueNumMax
    mov dword [esi + 0x038], QSIZE
%if HOSTILE == 5
    mov dword [esi + 0x080], BLK            ; the descriptor table over the MMIO window
%else
    mov dword [esi + 0x080], desc
%endif
    mov dword [esi + 0x084], 0
    mov dword [esi + 0x090], AVAIL
    mov dword [esi + 0x094], 0
    mov dword [esi + 0x0A0], USED
    mov dword [esi + 0x0A4], 0
    mov dword [esi + 0x044], 1              ; QueueReady
    mov dword [esi + 0x070], 0x0F           ; DRIVER_OK

%if HOSTILE == 0
    mov edi, WBUF                           ; the pattern: dword i = i * 0x01000193 + 7
    xor ecx, ecx
.fill:
    mov eax, ecx
    imul eax, eax, 0x01000193
    add eax, 7
    mov [edi + ecx * 4], eax
    inc ecx
    cmp ecx, 256
    jne .fill
    mov byte [STATUS + 0], 0xFF             ; status bytes the device must overwrite
    mov byte [STATUS + 16], 0xFF
    mov byte [STATUS + 32], 0xFF
    mov byte [STATUS + 48], 0xFF
    mov ebx, 0                              ; OUT: descriptors 0-2
    call submit
    mov ebx, 3                              ; FLUSH: 3-4
    call submit
    mov ebx, 5                              ; IN: 5-7
    call submit
    mov ebx, 8                              ; GET_ID: 8-10
    call submit
    mov ecx, 0                              ; report status byte and used len of each
.results:
    mov eax, ecx
    shl eax, 4
    movzx eax, byte [STATUS + eax]
    REPORT_EAX
    SEND [USED + 8 + ecx * 8]
    inc ecx
    cmp ecx, 4
    jne .results
    mov esi, WBUF                           ; compare what was read with what was written
    mov edi, RBUF
    mov ecx, 256
    repe cmpsd
    je .same
    mov eax, 256
    sub eax, ecx                            ; index of the first difference + 1
    REPORT_EAX
    jmp .serial
.same:
    SEND 0
.serial:
    SEND [IDBUF]
    SEND ALIVE
    jmp halt
%else
    ; --- the attack ---
%if HOSTILE == 4
    mov word [AVAIL + 4], 200               ; a head outside the 16-entry table
%else
    mov word [AVAIL + 4], 11                ; descriptor 11: the hostile chain
%endif
%if HOSTILE == 6
    mov word [AVAIL + 2], 1000              ; idx jumps far past the queue size
%else
    mov word [AVAIL + 2], 1
%endif
    mov dword [esi + 0x050], 0              ; QueueNotify (ioeventfd)
    mov ecx, SPINS
.wait_reset:
    test dword [esi + 0x070], 0x40          ; DEVICE_NEEDS_RESET
    jnz .needs_reset
    dec ecx
    jnz .wait_reset
    SEND TIMEOUT
    jmp halt
.needs_reset:
    SEND [esi + 0x070]
    call use_rng
    mov eax, [BLK]                          ; the broken device's transport still answers
    cmp eax, 0x74726976
    jne .dead
    SEND 0x4C495645
.dead:
    SEND ALIVE
    jmp halt
%endif

; submit: EBX = head descriptor. Publishes it, notifies, waits for the used idx to catch
; up with the avail idx. Clobbers EAX, ECX.
submit:
    movzx ecx, word [AVAIL + 2]
    mov eax, ecx
    and eax, QSIZE - 1
    mov [AVAIL + 4 + eax * 2], bx
    inc ecx
    mov [AVAIL + 2], cx                     ; x86 keeps the two stores in order
    mov dword [BLK + 0x050], 0
    mov eax, ecx
    mov ecx, SPINS
.wait:
    cmp [USED + 2], ax
    je .done
    dec ecx
    jnz .wait
    SEND TIMEOUT
    jmp halt
.done:
    ret

; use_rng: bring up the rng in slot 1, post one 16-byte buffer, report its used length.
use_rng:
    mov esi, RNG
    DEVICE_INIT esi, 0
    mov dword [esi + 0x030], 0
    mov dword [esi + 0x038], 8
    mov dword [esi + 0x080], RDESC
    mov dword [esi + 0x084], 0
    mov dword [esi + 0x090], RAVAIL
    mov dword [esi + 0x094], 0
    mov dword [esi + 0x0A0], RUSED
    mov dword [esi + 0x0A4], 0
    mov dword [esi + 0x044], 1
    mov dword [esi + 0x070], 0x0F
    mov dword [RDESC + 0], RBUFR
    mov dword [RDESC + 4], 0
    mov dword [RDESC + 8], 16
    mov word [RDESC + 12], 2                ; WRITE
    mov word [RAVAIL + 4], 0
    mov word [RAVAIL + 2], 1
    mov dword [esi + 0x050], 0
    mov ecx, SPINS
.wait:
    cmp word [RUSED + 2], 1
    je .done
    dec ecx
    jnz .wait
    SEND TIMEOUT
    jmp halt
.done:
    SEND [RUSED + 8]
    ret

    HALT

; --- static data: the descriptor table and the request headers -------------------------
NEXT    equ 1
WRITE   equ 2

%macro DESC 4                                ; addr, len, flags, next
    dq %1
    dd %2
    dw %3, %4
%endmacro

align 16
desc:
    DESC hdr_out, 16, NEXT, 1                ; 0: OUT header
    DESC WBUF, 1024, NEXT, 2                 ; 1: data (device-readable)
    DESC STATUS + 0, 1, WRITE, 0             ; 2: status
    DESC hdr_flush, 16, NEXT, 4              ; 3: FLUSH header
    DESC STATUS + 16, 1, WRITE, 0            ; 4: status
    DESC hdr_in, 16, NEXT, 6                 ; 5: IN header
    DESC RBUF, 1024, NEXT | WRITE, 7         ; 6: data (device-writable)
    DESC STATUS + 32, 1, WRITE, 0            ; 7: status
    DESC hdr_id, 16, NEXT, 9                 ; 8: GET_ID header
    DESC IDBUF, 20, NEXT | WRITE, 10         ; 9: the serial
    DESC STATUS + 48, 1, WRITE, 0            ; 10: status
%if HOSTILE == 1
    DESC hdr_in, 16, NEXT, 11                ; 11: links to itself
%elif HOSTILE == 2
    DESC 0xE0000000, 16, NEXT, 12            ; 11: header in the MMIO hole
%elif HOSTILE == 3
    DESC hdr_in, 16, NEXT, 12                ; 11: header, then
%else
    DESC hdr_in, 16, NEXT, 12                ; 11: an ordinary IN
%endif
%if HOSTILE == 3
    DESC RBUF, 0xFFFFF000, NEXT | WRITE, 13  ; 12: a 4 GiB buffer
%else
    DESC RBUF, 512, NEXT | WRITE, 13         ; 12
%endif
    DESC STATUS + 64, 1, WRITE, 0            ; 13
    times (QSIZE - 14) * 16 db 0

align 16
hdr_out:    dd 1, 0
            dq 1                             ; VIRTIO_BLK_T_OUT, sector 1
hdr_flush:  dd 4, 0
            dq 0                             ; VIRTIO_BLK_T_FLUSH
hdr_in:     dd 0, 0
            dq 1                             ; VIRTIO_BLK_T_IN, sector 1
hdr_id:     dd 8, 0
            dq 0                             ; VIRTIO_BLK_T_GET_ID

%include "serial_report.inc"
