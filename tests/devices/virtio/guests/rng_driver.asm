; rng_driver.asm - a minimal virtio-mmio entropy driver (virtio 1.2 §4.2.3, §5.4).
;
; Flat binary, 32-bit protected mode, paging off, loaded and entered at 0x100000 by
; tests/vmm/rawguest.py (flat segments, interrupts off, no stack needed). Kept tiny: on
; this PVM host every guest kernel-mode instruction is emulated (~1 us each).
;
; It reports 32-bit values with `out 0x500, eax`, in this order:
;   MagicValue, Version, DeviceID, DeviceFeatures[63:32], Status after FEATURES_OK,
;   QueueNumMax, then
;   HOSTILE=0: used.ring[0].id, used.ring[0].len, InterruptStatus once nonzero (then
;              ACKs it)
;   HOSTILE>0: Status once DEVICE_NEEDS_RESET (0x40) shows up
;   and finally ALIVE (0x600DF00D); 0xDEAD0001 instead if the wait timed out.
;
; HOSTILE=1 posts a descriptor whose `next` is itself (a loop); HOSTILE=2 one whose buffer
; lies in the MMIO hole (not RAM). Build: nasm -f bin -I <this directory>/ -DHOSTILE=<n>.

bits 32
org 0x100000

%ifndef HOSTILE
%define HOSTILE 0
%endif

MMIO    equ 0xD0000000      ; layout.VIRTIO_MMIO_BASE: the first virtio-mmio slot
REPORT  equ 0x500
DESC    equ 0x200000        ; 16-byte aligned descriptor table (8 entries)
AVAIL   equ 0x201000        ; available ring
USED    equ 0x202000        ; used ring
BUF     equ 0x203000        ; the 64-byte buffer the device fills
QSIZE   equ 8
ALIVE   equ 0x600DF00D
TIMEOUT equ 0xDEAD0001
SPINS   equ 200000          ; bounded wait: ~1 s of emulated instructions

%include "report.inc"

start:
    mov dx, REPORT
    mov esi, MMIO
    ; §4.2.3.1.1: check MagicValue and Version, then read DeviceID
    SEND [esi + 0x000]
    SEND [esi + 0x004]
    SEND [esi + 0x008]
    ; §3.1.1: reset, ACKNOWLEDGE, DRIVER
    mov dword [esi + 0x070], 0
    mov dword [esi + 0x070], 1
    mov dword [esi + 0x070], 3
    ; features: accept VIRTIO_F_VERSION_1 (bit 32) and nothing else
    mov dword [esi + 0x014], 1
    SEND [esi + 0x010]
    mov dword [esi + 0x024], 0
    mov dword [esi + 0x020], 0
    mov dword [esi + 0x024], 1
    mov dword [esi + 0x020], 1
    mov dword [esi + 0x070], 0x0B          ; FEATURES_OK ...
    SEND [esi + 0x070]                      ; ... and re-read it (§3.1.1 step 6)
    ; §4.2.3.2: queue 0 of QSIZE entries
    mov dword [esi + 0x030], 0
    SEND [esi + 0x034]
    mov dword [esi + 0x038], QSIZE
    mov dword [esi + 0x080], DESC
    mov dword [esi + 0x084], 0
    mov dword [esi + 0x090], AVAIL
    mov dword [esi + 0x094], 0
    mov dword [esi + 0x0A0], USED
    mov dword [esi + 0x0A4], 0
    mov dword [esi + 0x044], 1
    mov dword [esi + 0x070], 0x0F          ; DRIVER_OK
    ; descriptor 0: one device-writable buffer of 64 bytes
%if HOSTILE == 2
    mov dword [DESC + 0], 0xE0000000        ; in the MMIO hole
%else
    mov dword [DESC + 0], BUF
%endif
    mov dword [DESC + 4], 0
    mov dword [DESC + 8], 64
%if HOSTILE == 1
    mov word [DESC + 12], 3                 ; NEXT | WRITE ...
%else
    mov word [DESC + 12], 2                 ; WRITE
%endif
    mov word [DESC + 14], 0                 ; ... and next = 0: itself
    mov word [AVAIL + 4], 0                 ; ring[0] = head 0
    mov word [AVAIL + 2], 1                 ; idx = 1 (x86 keeps the stores in order)
    mov dword [esi + 0x050], 0              ; QueueNotify: caught by the ioeventfd
    mov ecx, SPINS
.wait:
%if HOSTILE
    test dword [esi + 0x070], 0x40          ; DEVICE_NEEDS_RESET
    jnz .needs_reset
%else
    cmp word [USED + 2], 1                  ; used idx
    je .used
%endif
    dec ecx
    jnz .wait
    SEND TIMEOUT
    jmp .halt
%if HOSTILE
.needs_reset:
    SEND [esi + 0x070]
%else
.used:
    mov ecx, SPINS                          ; the interrupt follows the used idx closely
.irq:
    mov ebx, [esi + 0x060]                  ; InterruptStatus
    test ebx, ebx
    jnz .irq_seen
    dec ecx
    jnz .irq
.irq_seen:
    SEND [USED + 4]
    SEND [USED + 8]
    SEND ebx
    mov [esi + 0x064], ebx                  ; InterruptACK
%endif
    SEND ALIVE
.halt:
    hlt
    jmp .halt
