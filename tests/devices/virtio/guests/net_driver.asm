; net_driver.asm - a minimal virtio-mmio network driver (virtio 1.2 §4.2.3, §5.1).
;
; Flat binary, 32-bit protected mode, paging off, loaded and entered at 0x100000 by
; tests/vmm/rawguest.py (flat segments, interrupts off, no stack needed). Kept tiny: on
; this PVM host every guest kernel-mode instruction is emulated (~1 us each).
;
; The virtio-net device is in slot 0 (0xD0000000), a virtio-rng in slot 1 (0xD0001000).
; It reports 32-bit values with `out 0x500, eax`, in this order:
;   MagicValue, Version, DeviceID, DeviceFeatures[31:0], Status after FEATURES_OK,
;   config status (link), then
;   HOSTILE=0: sends one frame (dst broadcast, src = the config MAC, ethertype 0x88B5,
;              payload "isovisor-ping") and reports the TX used id and len (and with
;              -DNO_REPLY stops there: tests/network/test_network_daemon.py); waits for a
;              frame back and reports its used len, num_buffers, ethertype (big-endian
;              word) and 1 if its payload starts "isovisor-pong" (else 0); then
;              InterruptStatus (and ACKs it)
;   HOSTILE>0: posts a malformed chain, reports Status once DEVICE_NEEDS_RESET (0x40) shows
;              up, then drives the rng in slot 1 and reports its used len (64): the other
;              device still serves
;   and finally ALIVE (0x600DF00D); 0xDEAD0001 instead if a wait timed out.
;
; HOSTILE=1: a transmit descriptor whose `next` is itself (a loop);
; HOSTILE=2: a receive buffer in the MMIO hole (not RAM);
; HOSTILE=3: a transmit descriptor of 0xFFFFFFF0 bytes (runs past RAM).
; Build: nasm -f bin -I <this directory>/ -DHOSTILE=<n> (driver_guests.py).

bits 32
org 0x100000

%ifndef HOSTILE
%define HOSTILE 0
%endif

NET     equ 0xD0000000      ; slot 0
RNG     equ 0xD0001000      ; slot 1
REPORT  equ 0x500
RXDESC  equ 0x200000        ; receive queue (8 entries)
RXAVAIL equ 0x201000
RXUSED  equ 0x202000
TXDESC  equ 0x210000        ; transmit queue (8 entries)
TXAVAIL equ 0x211000
TXUSED  equ 0x212000
TXBUF   equ 0x220000        ; 12-byte header + 60-byte frame
RXBUF   equ 0x230000        ; two 2048-byte receive buffers
RQDESC  equ 0x240000        ; rng queue
RQAVAIL equ 0x241000
RQUSED  equ 0x242000
RQBUF   equ 0x243000
QSIZE   equ 8
ALIVE   equ 0x600DF00D
TIMEOUT equ 0xDEAD0001
SPINS   equ 5000000         ; bounded waits: seconds of emulated instructions
; Driver features: MAC (5), MRG_RXBUF (15), STATUS (16); VERSION_1 in the high word.
FEATURES equ (1 << 5) | (1 << 15) | (1 << 16)

%include "report.inc"

%include "virtio_mmio.inc"

start:
%ifdef SERIAL
    mov esp, 0x1FF000                       ; serial_report is called: it needs a stack
%endif
    mov dx, REPORT
    mov esi, NET
    SEND [esi + 0x000]
    SEND [esi + 0x004]
    SEND [esi + 0x008]
    mov dword [esi + 0x070], 0              ; reset, ACKNOWLEDGE, DRIVER (§3.1.1)
    mov dword [esi + 0x070], 1
    mov dword [esi + 0x070], 3
    mov dword [esi + 0x014], 0
    SEND [esi + 0x010]                      ; device features 31:0
    mov dword [esi + 0x024], 0
    mov dword [esi + 0x020], FEATURES
    mov dword [esi + 0x024], 1
    mov dword [esi + 0x020], 1              ; VIRTIO_F_VERSION_1
    mov dword [esi + 0x070], 0x0B           ; FEATURES_OK ...
    SEND [esi + 0x070]                      ; ... re-read (§3.1.1 step 6)
    ; config: mac[6] into the frame's source address, then the link status (§5.1.4)
    mov eax, [esi + 0x100]
    mov [TXBUF + 12 + 6], eax
    mov ax, [esi + 0x104]
    mov [TXBUF + 12 + 10], ax
    movzx eax, word [esi + 0x106]
    REPORT_EAX
    SETUP_QUEUE esi, 0, RXDESC, RXAVAIL, RXUSED
    SETUP_QUEUE esi, 1, TXDESC, TXAVAIL, TXUSED
    mov dword [esi + 0x070], 0x0F           ; DRIVER_OK

%if HOSTILE == 0
    ; two receive buffers of 2048 bytes (device-writable)
    mov dword [RXDESC + 0], RXBUF
    mov dword [RXDESC + 8], 2048
    mov word [RXDESC + 12], 2
    mov dword [RXDESC + 16], RXBUF + 2048
    mov dword [RXDESC + 24], 2048
    mov word [RXDESC + 28], 2
    mov word [RXAVAIL + 4], 0
    mov word [RXAVAIL + 6], 1
    mov word [RXAVAIL + 2], 2
    mov dword [esi + 0x050], 0              ; notify the receive queue
    ; the frame: zero header, broadcast destination, our MAC, 0x88B5, "isovisor-ping"
    mov dword [TXBUF + 12], 0xFFFFFFFF
    mov word [TXBUF + 16], 0xFFFF
    mov word [TXBUF + 24], 0xB588
    mov edi, TXBUF + 26
    mov ebx, ping
    mov ecx, ping_len
.copy:
    mov al, [ebx]
    mov [edi], al
    inc ebx
    inc edi
    dec ecx
    jnz .copy
    mov dword [TXDESC + 0], TXBUF           ; header + frame in one descriptor
    mov dword [TXDESC + 8], 72
    mov word [TXDESC + 12], 0
    mov word [TXAVAIL + 4], 0
    mov word [TXAVAIL + 2], 1
    mov dword [esi + 0x050], 1              ; notify the transmit queue
    WAIT_WORD TXUSED + 2, 1
    SEND [TXUSED + 4]
    SEND [TXUSED + 8]
%ifndef NO_REPLY
    WAIT_WORD RXUSED + 2, 1
    SEND [RXUSED + 8]                       ; used len: header + frame
    movzx eax, word [RXBUF + 10]            ; num_buffers
    REPORT_EAX
    movzx eax, word [RXBUF + 12 + 12]       ; ethertype, as stored
    REPORT_EAX
    mov edi, RXBUF + 12 + 14
    mov ebp, pong
    mov ecx, pong_len
    xor eax, eax
.cmp:
    mov bl, [ebp]
    cmp bl, [edi]
    jne .cmp_done
    inc ebp
    inc edi
    dec ecx
    jnz .cmp
    mov eax, 1
.cmp_done:
    REPORT_EAX
    mov ebx, [esi + 0x060]                  ; InterruptStatus
    SEND ebx
    mov [esi + 0x064], ebx                  ; InterruptACK
%endif
%else
%if HOSTILE == 2
    mov dword [RXDESC + 0], 0xE0000000      ; not RAM
    mov dword [RXDESC + 8], 2048
    mov word [RXDESC + 12], 2
    mov word [RXAVAIL + 4], 0
    mov word [RXAVAIL + 2], 1
    mov dword [esi + 0x050], 0
%else
    mov dword [TXDESC + 0], TXBUF
%if HOSTILE == 1
    mov dword [TXDESC + 8], 72
    mov word [TXDESC + 12], 1               ; NEXT ...
    mov word [TXDESC + 14], 0               ; ... to itself
%else
    mov dword [TXDESC + 8], 0xFFFFFFF0      ; runs past RAM
    mov word [TXDESC + 12], 0
%endif
    mov word [TXAVAIL + 4], 0
    mov word [TXAVAIL + 2], 1
    mov dword [esi + 0x050], 1
%endif
    mov ecx, SPINS
.needs_reset:
    test dword [esi + 0x070], 0x40          ; DEVICE_NEEDS_RESET
    jnz .broken
    dec ecx
    jnz .needs_reset
    jmp timeout
.broken:
    SEND [esi + 0x070]
    ; the rng beside it: reset, features (VERSION_1 only), one queue, one buffer
    mov esi, RNG
    DEVICE_INIT esi, 0
    SETUP_QUEUE esi, 0, RQDESC, RQAVAIL, RQUSED
    mov dword [esi + 0x070], 0x0F
    mov dword [RQDESC + 0], RQBUF
    mov dword [RQDESC + 8], 64
    mov word [RQDESC + 12], 2
    mov word [RQAVAIL + 4], 0
    mov word [RQAVAIL + 2], 1
    mov dword [esi + 0x050], 0
    WAIT_WORD RQUSED + 2, 1
    SEND [RQUSED + 8]
%endif
    SEND ALIVE
    HALT
timeout:
    SEND TIMEOUT
    jmp halt

ping: db "isovisor-ping"
ping_len equ $ - ping
pong: db "isovisor-pong"
pong_len equ $ - pong

%include "serial_report.inc"
