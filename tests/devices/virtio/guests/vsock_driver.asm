; vsock_driver.asm - a minimal virtio-mmio socket driver (virtio 1.2 §4.2.3, §5.10).
;
; Flat binary, 32-bit protected mode, paging off, loaded and entered at 0x100000 by
; tests/vmm/rawguest.py (flat segments, interrupts off, no stack). Kept tiny: on this PVM
; host every guest kernel-mode instruction is emulated (~1 us each). Guest RAM starts
; zeroed, so fields that must be 0 are not written.
;
; The vsock device is in the first virtio-mmio slot, virtio-rng (hostile runs) in the
; second. Reports 32-bit values with `out 0x500, eax`:
;   DeviceID, guest_cid (config, low half), Status after FEATURES_OK, then
;   HOSTILE=0: connect to host port PORT, send "ping", expect "pong", close:
;              type|op<<16 of the 1st rx packet (RESPONSE: 0x00020001),
;              type|op<<16, len and payload of the 2nd (RW: 0x00050001, 4, "pong"),
;              type|op<<16 of the 3rd, after our SHUTDOWN (RST: 0x00030001)
;   HOSTILE=1: a REQUEST with a spoofed src_cid; HOSTILE=2: a tx descriptor looping to
;              itself. Then Status once DEVICE_NEEDS_RESET shows, then virtio-rng's used
;              length for a 16-byte request (the other device still works)
;   and finally ALIVE (0x600DF00D); 0xDEAD0001 instead if a wait timed out.
;
; Build: nasm -f bin -I <this directory>/ -DHOSTILE=<n> -DPORT=<p> (driver_guests.py).

bits 32
org 0x100000

%ifndef HOSTILE
%define HOSTILE 0
%endif
%ifndef PORT
%define PORT 5000
%endif

MMIO    equ 0xD0000000      ; slot 0: virtio-vsock
RNG     equ 0xD0001000      ; slot 1: virtio-rng
REPORT  equ 0x500
RXD     equ 0x200000        ; rx queue (0): descriptors, available ring, used ring
RXA     equ 0x201000
RXU     equ 0x202000
TXD     equ 0x203000        ; tx queue (1)
TXA     equ 0x204000
TXU     equ 0x205000
RXB0    equ 0x206000        ; two 128-byte rx buffers: header + up to 84 payload bytes
RXB1    equ 0x206100
RNGD    equ 0x208000        ; rng queue
RNGA    equ 0x209000
RNGU    equ 0x20A000
RNGBUF  equ 0x20B000
QSIZE   equ 8
ALIVE   equ 0x600DF00D
TIMEOUT equ 0xDEAD0001
SPINS   equ 2000000         ; bounded waits: several seconds of emulated instructions

%include "report.inc"

%include "virtio_mmio.inc"

; SETUPQ base, index, desc, avail, used: §4.2.3.2 queue setup (size QSIZE)
%macro SETUPQ 5
    mov dword [%1 + 0x030], %2
    mov dword [%1 + 0x038], QSIZE
    mov dword [%1 + 0x080], %3
    mov dword [%1 + 0x090], %4
    mov dword [%1 + 0x0A0], %5
    mov dword [%1 + 0x044], 1
%endmacro

; INIT base: §3.1.1 reset, ACKNOWLEDGE, DRIVER, features = VIRTIO_F_VERSION_1, FEATURES_OK
%macro INIT 1
    mov dword [%1 + 0x070], 0
    mov dword [%1 + 0x070], 1
    mov dword [%1 + 0x070], 3
    mov dword [%1 + 0x024], 1
    mov dword [%1 + 0x020], 1
    mov dword [%1 + 0x070], 0x0B
%endmacro

; DESC table, i, addr, len, flags_next (flags | next << 16)
%macro DESC 5
    mov dword [%1 + 16 * %2], %3
    mov dword [%1 + 16 * %2 + 8], %4
    mov dword [%1 + 16 * %2 + 12], %5
%endmacro

start:
%ifdef SERIAL
    mov esp, 0x1FF000                       ; serial_report is called: it needs a stack
%endif
    mov dx, REPORT
    mov esi, MMIO
    SEND [esi + 0x008]                      ; DeviceID: 19
    mov ebx, [esi + 0x100]                  ; §5.10.4 guest_cid
    SEND ebx
    INIT esi
    SEND [esi + 0x070]
    SETUPQ esi, 0, RXD, RXA, RXU
    SETUPQ esi, 1, TXD, TXA, TXU
    mov dword [esi + 0x070], 0x0F           ; DRIVER_OK
%if HOSTILE == 1
    inc ebx                                 ; claim another guest's CID
%endif
    mov [req], ebx                          ; §5.10.6.4: src_cid = guest_cid
    mov [ping], ebx
    mov [shut], ebx
    ; two rx buffers, device-writable
    DESC RXD, 0, RXB0, 128, 2
    DESC RXD, 1, RXB1, 128, 2
    mov dword [RXA + 4], 0x00010000         ; ring[0] = 0, ring[1] = 1
    mov word [RXA + 2], 2
    mov dword [esi + 0x050], 0
    ; tx descriptors: the three packets, device-readable
%if HOSTILE == 2
    DESC TXD, 0, req, 44, 1                 ; NEXT, next = 0: itself
%else
    DESC TXD, 0, req, 44, 0
%endif
    DESC TXD, 1, ping, 48, 0
    DESC TXD, 2, shut, 44, 0
    mov word [TXA + 2], 1                   ; ring[0] = 0 (zero already): REQUEST
    mov dword [esi + 0x050], 1
%if HOSTILE
    mov ecx, SPINS
.broken:
    test dword [esi + 0x070], 0x40          ; DEVICE_NEEDS_RESET
    jnz .rng
    dec ecx
    jnz .broken
    jmp timeout
.rng:
    SEND [esi + 0x070]
    mov edi, RNG
    INIT edi
    SETUPQ edi, 0, RNGD, RNGA, RNGU
    mov dword [edi + 0x070], 0x0F
    DESC RNGD, 0, RNGBUF, 16, 2
    mov word [RNGA + 2], 1
    mov dword [edi + 0x050], 0
    WAIT_WORD RNGU + 2, 1
    SEND [RNGU + 8]                         ; used len: 16
%else
    WAIT_WORD RXU + 2, 1
    SEND [RXB0 + 28]                        ; type | op << 16: RESPONSE
    mov word [TXA + 6], 1                   ; ring[1] = 1: RW "ping"
    mov word [TXA + 2], 2
    mov dword [esi + 0x050], 1
    WAIT_WORD RXU + 2, 2
    SEND [RXB1 + 28]                        ; RW
    SEND [RXB1 + 24]                        ; len
    SEND [RXB1 + 44]                        ; "pong"
    mov word [RXA + 8], 0                   ; ring[2] = 0: rx buffer 0 again
    mov word [RXA + 2], 3
    mov dword [esi + 0x050], 0
    mov word [TXA + 8], 2                   ; ring[2] = 2: SHUTDOWN(RCV|SEND)
    mov word [TXA + 2], 3
    mov dword [esi + 0x050], 1
    WAIT_WORD RXU + 2, 3
    SEND [RXB0 + 28]                        ; RST: the clean disconnect (§5.10.6.5)
%endif
    SEND ALIVE
    jmp halt
timeout:
    SEND TIMEOUT
    HALT

; struct virtio_vsock_hdr: src_cid, dst_cid, src_port, dst_port, len, type, op, flags,
; buf_alloc, fwd_cnt (§5.10.6); src_cid is filled in from the config above.
align 16
req:    dq 0, 2
        dd 1024, PORT, 0
        dw 1, 1                             ; STREAM, REQUEST
        dd 0, 4096, 0
align 16
ping:   dq 0, 2
        dd 1024, PORT, 4
        dw 1, 5                             ; STREAM, RW
        dd 0, 4096, 0
        db "ping"
align 16
shut:   dq 0, 2
        dd 1024, PORT, 0
        dw 1, 4                             ; STREAM, SHUTDOWN
        dd 3, 4096, 4                       ; RCV | SEND; we consumed "pong"

%include "serial_report.inc"
