; virtio_hostile.asm - a hostile virtio driver, as a PVH kernel for `isovisor run`.
;
; Finds the first virtio-mmio device in isovisor's window (0xD0000000 + n * 0x1000,
; n < 8), sets it up properly (ACKNOWLEDGE, DRIVER, VIRTIO_F_VERSION_1, FEATURES_OK, queue
; 0 of 16 entries in RAM, DRIVER_OK), then offers it a malformed chain: descriptor 0
; has VIRTQ_DESC_F_NEXT and `next` = 0, a loop. The device must refuse it: it sets
; DEVICE_NEEDS_RESET and reports a security event ("virtio-needs-reset"), and the VM
; keeps running. Prints, on COM1:
;   hostile: device 0x........ id ........
;   hostile: device needs reset        (or: hostile: device did not refuse the chain)
; then halts with interrupts off (the VM stays up until the host stops it).
;
; Build: nasm -f elf32 -I guests/include/ virtio_hostile.asm; ld -T guests/guest.ld.

%include "pvh.inc"

ISO_BASE    equ 0xD0000000
ISO_STRIDE  equ 0x1000
ISO_END     equ 0xD0008000
VIRTIO_MAGIC equ 0x74726976
R_MAGIC     equ 0x000
R_VERSION   equ 0x004
R_DEVICE_ID equ 0x008
R_DRV_FEAT  equ 0x020
R_DRV_FEAT_SEL equ 0x024
R_QUEUE_SEL equ 0x030
R_QUEUE_NUM equ 0x038
R_QUEUE_READY equ 0x044
R_QUEUE_NOTIFY equ 0x050
R_STATUS    equ 0x070
R_DESC_LO   equ 0x080
R_DESC_HI   equ 0x084
R_AVAIL_LO  equ 0x090
R_AVAIL_HI  equ 0x094
R_USED_LO   equ 0x0A0
R_USED_HI   equ 0x0A4
NEEDS_RESET equ 0x40
QSIZE       equ 16
DESC        equ 0x200000
AVAIL       equ 0x201000
USED        equ 0x202000
BUF         equ 0x203000
WAIT_POLLS  equ 20000

section .text
main:
    mov ebx, ISO_BASE
.scan:
    cmp dword [ebx + R_MAGIC], VIRTIO_MAGIC
    jne .next
    cmp dword [ebx + R_VERSION], 2
    jne .next
    cmp dword [ebx + R_DEVICE_ID], 0
    jne .found
.next:
    add ebx, ISO_STRIDE
    cmp ebx, ISO_END
    jb .scan
    PRINTLN "hostile: no virtio device"
    jmp halt
.found:
    PRINT "hostile: device "
    mov eax, ebx
    call serial_put_hex32
    PRINT " id "
    mov eax, [ebx + R_DEVICE_ID]
    call serial_put_hex32
    call serial_newline
    mov dword [ebx + R_STATUS], 0
    mov dword [ebx + R_STATUS], 1           ; ACKNOWLEDGE
    mov dword [ebx + R_STATUS], 3           ; DRIVER
    mov dword [ebx + R_DRV_FEAT_SEL], 1
    mov dword [ebx + R_DRV_FEAT], 1         ; VIRTIO_F_VERSION_1 (bit 32)
    mov dword [ebx + R_DRV_FEAT_SEL], 0
    mov dword [ebx + R_DRV_FEAT], 0
    mov dword [ebx + R_STATUS], 0x0B        ; FEATURES_OK
    mov dword [ebx + R_QUEUE_SEL], 0
    mov dword [ebx + R_QUEUE_NUM], QSIZE
    mov dword [ebx + R_DESC_LO], DESC
    mov dword [ebx + R_DESC_HI], 0
    mov dword [ebx + R_AVAIL_LO], AVAIL
    mov dword [ebx + R_AVAIL_HI], 0
    mov dword [ebx + R_USED_LO], USED
    mov dword [ebx + R_USED_HI], 0
    mov dword [ebx + R_QUEUE_READY], 1
    mov dword [ebx + R_STATUS], 0x0F        ; DRIVER_OK
    ; the malformed chain: descriptor 0 -> descriptor 0 -> ...
    mov dword [DESC], BUF
    mov dword [DESC + 4], 0
    mov dword [DESC + 8], 16
    mov word [DESC + 12], 3                 ; NEXT | WRITE
    mov word [DESC + 14], 0                 ; next = itself
    mov word [AVAIL], 0
    mov word [AVAIL + 4], 0                 ; ring[0] = head 0
    mov word [AVAIL + 2], 1                 ; idx = 1
    mov dword [ebx + R_QUEUE_NOTIFY], 0
    mov ecx, WAIT_POLLS
.wait:
    test dword [ebx + R_STATUS], NEEDS_RESET
    jnz .refused
    dec ecx
    jnz .wait
    PRINTLN "hostile: device did not refuse the chain"
    jmp halt
.refused:
    PRINTLN "hostile: device needs reset"
halt:
    cli
    hlt
    jmp halt
