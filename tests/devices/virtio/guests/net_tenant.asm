; net_tenant.asm - a raw virtio-mmio network guest for the tenant-network tests
; (tests/network/test_tenant_guests.py): a sender that transmits a table of frames, or a
; receiver that logs every frame it gets. The driver sequence is net_driver.asm's
; (virtio 1.2 §4.2.3, §5.1): reset, ACKNOWLEDGE, DRIVER, features MAC + VERSION_1,
; FEATURES_OK, both queues, DRIVER_OK.
;
; Flat binary, 32-bit protected mode, paging off, loaded and entered at 0x100000 by
; tests/vmm/rawguest.py. Reports go to port 0x500 (`out dx, eax`): MagicValue, Status after
; FEATURES_OK, then
;   ROLE=1 (sender): for each frame of the table at TABLE (dword count at TABLE, entry i at
;     TABLE + 16 + 128*i: dword frame length, then at +16 a zero 12-byte virtio-net header
;     and the frame), publish it, wait until the device used it; then report the number
;     sent and ALIVE.
;   ROLE=2 (receiver): post 8 receive buffers, report READY, then forever: for each used
;     buffer, log its length and first 112 bytes at LOG + 128*n (n < 64; the count of
;     frames at LOG - 16), and post the buffer again. The host reads the log from guest
;     memory and stops the VM.
; 0xDEAD0001 instead when a wait timed out.
; Build: nasm -f bin -I <this directory>/ -DROLE=<1|2> (driver_guests.py).

bits 32
org 0x100000

NET     equ 0xD0000000      ; slot 0
REPORT  equ 0x500
RXDESC  equ 0x200000        ; receive queue (8 entries)
RXAVAIL equ 0x201000
RXUSED  equ 0x202000
TXDESC  equ 0x210000        ; transmit queue (8 entries)
TXAVAIL equ 0x211000
TXUSED  equ 0x212000
RXBUF   equ 0x230000        ; eight 2048-byte receive buffers
TABLE   equ 0x300000        ; the sender's frames (written by the host before the start)
LOG     equ 0x400010        ; the receiver's log; frame count at LOG - 16
LOGMAX  equ 64
QSIZE   equ 8
ALIVE   equ 0x600DF00D
READY   equ 0x0EAD0001
TIMEOUT equ 0xDEAD0001
SPINS   equ 5000000
FEATURES equ (1 << 5)       ; MAC; VERSION_1 in the high word

%include "report.inc"

%include "virtio_mmio.inc"

start:
    mov dx, REPORT
    mov esi, NET
    SEND [esi + 0x000]
    mov dword [esi + 0x070], 0              ; reset, ACKNOWLEDGE, DRIVER
    mov dword [esi + 0x070], 1
    mov dword [esi + 0x070], 3
    mov dword [esi + 0x024], 0
    mov dword [esi + 0x020], FEATURES
    mov dword [esi + 0x024], 1
    mov dword [esi + 0x020], 1              ; VIRTIO_F_VERSION_1
    mov dword [esi + 0x070], 0x0B           ; FEATURES_OK ...
    SEND [esi + 0x070]                      ; ... re-read
    SETUP_QUEUE esi, 0, RXDESC, RXAVAIL, RXUSED
    SETUP_QUEUE esi, 1, TXDESC, TXAVAIL, TXUSED
    mov dword [esi + 0x070], 0x0F           ; DRIVER_OK

%if ROLE == 1
    mov ebx, 0                              ; frames sent
.next:
    cmp ebx, [TABLE]
    jae .sent
    mov edi, ebx
    shl edi, 7
    add edi, TABLE + 16                     ; this entry
    mov ecx, ebx
    and ecx, QSIZE - 1                      ; descriptor = ring slot = i mod 8
    mov eax, ecx
    shl eax, 4
    lea ebp, [edi + 16]
    mov [TXDESC + eax], ebp                 ; addr: header + frame
    mov dword [TXDESC + eax + 4], 0
    mov ebp, [edi]
    add ebp, 12
    mov [TXDESC + eax + 8], ebp             ; len
    mov word [TXDESC + eax + 12], 0         ; flags: device-readable, last
    mov [TXAVAIL + 4 + ecx * 2], cx         ; ring[i mod 8] = descriptor
    inc ebx
    mov [TXAVAIL + 2], bx                   ; avail idx = i + 1
    mov dword [esi + 0x050], 1              ; notify the transmit queue
    mov ecx, SPINS
.wait:
    cmp [TXUSED + 2], bx
    je .next
    dec ecx
    jnz .wait
    jmp timeout
.sent:
    SEND ebx
    SEND ALIVE
%else
    mov dword [LOG - 16], 0
    xor ecx, ecx
.post:                                      ; eight 2048-byte device-writable buffers
    mov eax, ecx
    shl eax, 4
    mov edi, ecx
    shl edi, 11
    add edi, RXBUF
    mov [RXDESC + eax], edi
    mov dword [RXDESC + eax + 4], 0
    mov dword [RXDESC + eax + 8], 2048
    mov word [RXDESC + eax + 12], 2         ; WRITE
    mov [RXAVAIL + 4 + ecx * 2], cx
    inc ecx
    cmp ecx, QSIZE
    jb .post
    mov word [RXAVAIL + 2], QSIZE
    mov dword [esi + 0x050], 0              ; notify the receive queue
    SEND READY
    xor ebx, ebx                            ; used entries consumed
.poll:
    cmp [RXUSED + 2], bx
    je .poll
    mov ecx, ebx
    and ecx, QSIZE - 1
    mov eax, [RXUSED + 4 + ecx * 8]         ; used id (= descriptor = buffer)
    mov ebp, [RXUSED + 8 + ecx * 8]         ; used len
    mov ecx, [LOG - 16]
    cmp ecx, LOGMAX
    jae .repost
    shl ecx, 7
    add ecx, LOG
    mov [ecx], ebp                          ; log: length, then the first 112 bytes
    push esi
    mov esi, eax
    shl esi, 11
    add esi, RXBUF
    lea edi, [ecx + 16]
    mov ecx, 112 / 4
    cld
    rep movsd
    pop esi
.repost:
    inc dword [LOG - 16]
    mov ecx, ebx
    add ecx, QSIZE                          ; this buffer's next avail slot: idx + 8 - 8
    and ecx, QSIZE - 1
    mov [RXAVAIL + 4 + ecx * 2], ax
    inc ebx
    mov ecx, ebx
    add ecx, QSIZE
    mov [RXAVAIL + 2], cx                   ; avail idx = consumed + 8
    mov dword [esi + 0x050], 0
    jmp .poll
%endif

halt:
    hlt
    jmp halt
timeout:
    SEND TIMEOUT
    jmp halt
