; blk_bench.asm - a PVH guest that measures a VMM's virtio-blk (bench/blk.py) and, with a
; rate limit, shows the limit holding (tests/devices/virtio/test_blk_ratelimit.py).
;
; `nasm -f elf32 -I guests/include/` (pvh_bare.inc, cmdline_tokens.inc, serial_out.inc),
; then `ld -m elf_i386 -T blk_bench.ld` (loaded at 1 MiB, PVH note in a PT_NOTE). The
; same ELF runs under isovisor and QEMU microvm: it finds the block device by scanning
; both VMMs' virtio-mmio windows for MagicValue 0x74726976, Version 2 and DeviceID 2:
; isovisor's at 0xD0000000 + n * 0x1000 (n < 8), QEMU microvm's at 0xFEB00000 + n * 0x200
; (n < 32). Reads of unclaimed addresses return all-ones (isovisor) or zeros (QEMU):
; neither matches.
;
; Command line (hvm_start_info.cmdline_paddr), space-separated, all optional:
;   mode=seq|rand   seq: 64 KiB reads walking the disk from sector 0 (wrapping);
;                   rand: 4 KiB reads at pseudo-random 4 KiB-aligned offsets (default seq)
;   rounds=<n>      rounds to time (default 100); every round is DEPTH requests
;   wait=poll|hlt   how the vCPU waits for a round to complete: poll spins on used.idx
;                   (default); hlt sleeps until the local APIC timer (periodic, every
;                   TICK_NS) wakes it to look again, which leaves the host CPU to the
;                   VMM's I/O thread: on a 2-core host a spinning vCPU takes half of it
; Output on COM1, lines ending CR LF:
;   blkbench: device=0xd0000000 capacity=131072 mode=seq rounds=100 depth=64 size=65536
;   blkbench: start
;   blkbench: done status=ok
; (`status=bad` if any request of the last round did not end with VIRTIO_BLK_S_OK.)
; Errors print `blkbench: error <what>`. Then the guest resets (i8042; else triple fault).
;
; Why it looks like this: on a PVM host guest kernel-mode code is interpreted by KVM
; (~1 us per instruction), so per-request guest work is kept near zero. Everything is
; prepared before the start line: the descriptor table (DEPTH chains of header, data,
; status), the whole available ring (entry j names chain j mod DEPTH, so it never needs
; rewriting), and the request headers of every round (up to MAX_ROUNDS distinct rounds,
; then they repeat). A round is then: one `rep movsd` copying that round's headers into
; place, avail.idx += DEPTH, one QueueNotify, and a poll of used.idx: about ten
; instructions for DEPTH requests. VIRTQ_AVAIL_F_NO_INTERRUPT spares both VMMs the
; interrupts nobody waits for.

bits 32

%include "pvh_bare.inc"


CMDLINE_MAX equ 1024

VIRTIO_MAGIC equ 0x74726976
ISO_BASE    equ 0xD0000000
ISO_STRIDE  equ 0x1000
ISO_COUNT   equ 8
QEMU_BASE   equ 0xFEB00000
QEMU_STRIDE equ 0x200
QEMU_COUNT  equ 32

QSIZE       equ 256                 ; queue size used (both VMMs offer 256)
DEPTH       equ 64                  ; requests per round: 3 descriptors each, 192 <= 256
MAX_ROUNDS  equ 64                  ; distinct rounds of headers prepared
DESC        equ 0x200000            ; descriptor table, 16 * 256
AVAIL       equ 0x201000            ; available ring
USED        equ 0x202000            ; used ring
HDR         equ 0x204000            ; the DEPTH headers in use (16 bytes each)
STATUS      equ 0x205000            ; DEPTH status bytes
HDRIMG      equ 0x300000            ; MAX_ROUNDS * DEPTH headers, round after round
DATA        equ 0x1000000           ; DEPTH data buffers of `size` bytes
SEQ_SIZE    equ 65536
RAND_SIZE   equ 4096
DEFAULT_ROUNDS equ 100
LAPIC       equ 0xFEE00000          ; the same in both VMMs (KVM's in-kernel local APIC)
LAPIC_EOI   equ 0x0B0
LAPIC_SVR   equ 0x0F0
LAPIC_LVT_TIMER equ 0x320
LAPIC_TIMER_INIT equ 0x380
LAPIC_TIMER_DIV equ 0x3E0
TIMER_VECTOR equ 0x30
SPURIOUS_VECTOR equ 0x31
TICK_NS     equ 50000               ; KVM's APIC timer counts 1 ns per tick at divide 1

; ---------------------------------------------------------------------------
PVH_NOTE

; ---------------------------------------------------------------------------
section .rodata
FLAT_GDT
idt_desc:                           ; vectors 0..0x31; only the two below are present:
    dw (SPURIOUS_VECTOR + 1) * 8 - 1 ; any exception is still a triple fault (a reset)
    dd idt

key_mode:   db "mode=", 0
key_rounds: db "rounds=", 0
key_wait:   db "wait=", 0
val_poll:   db "poll", 0
val_hlt:    db "hlt", 0
val_seq:    db "seq", 0
val_rand:   db "rand", 0
msg_prefix: db "blkbench: ", 0
msg_device: db "device=", 0
msg_cap:    db " capacity=", 0
msg_mode:   db " mode=", 0
msg_rounds: db " rounds=", 0
msg_depth:  db " depth=", 0
msg_size:   db " size=", 0
msg_start:  db "start", 0
msg_done:   db "done status=", 0
msg_ok:     db "ok", 0
msg_bad:    db "bad", 0
err_magic:  db "error bad hvm_start_info magic", 0
err_mode:   db "error mode must be seq or rand", 0
err_num:    db "error bad number in rounds=", 0
err_wait:   db "error wait must be poll or hlt", 0
err_nodev:  db "error no virtio-blk device found", 0
err_feat:   db "error FEATURES_OK refused", 0
err_qmax:   db "error QueueNumMax below 256", 0
err_small:  db "error disk smaller than one round", 0

; ---------------------------------------------------------------------------
section .bss
alignb 16
stack:      resb 4096
stack_top:
cmdline:    resd 1
rand_mode:  resd 1
rounds:     resd 1
mmio:       resd 1
capacity:   resd 1                  ; sectors (low 32 bits)
size:       resd 1                  ; bytes per request
nrounds:    resd 1                  ; distinct rounds prepared
seed:       resd 1
hlt_mode:   resd 1
alignb 8
idt:        resq SPURIOUS_VECTOR + 1

; ---------------------------------------------------------------------------
section .text
global pvh_entry
pvh_entry:
    ENTER_FLAT

    mov dword [rand_mode], 0
    mov dword [hlt_mode], 0
    mov dword [rounds], DEFAULT_ROUNDS
    READ_START_INFO
    mov esi, key_mode
    call find_key
    test esi, esi
    jz .mode_done
    mov edi, val_seq
    call token_equals
    jnc .mode_done
    mov edi, val_rand
    call token_equals
    jc .bad_mode
    mov dword [rand_mode], 1
.mode_done:
    mov esi, key_rounds
    call find_key
    test esi, esi
    jz .rounds_done
    call parse_number
    jc .bad_number
    mov [rounds], eax
.rounds_done:
    mov esi, key_wait
    call find_key
    test esi, esi
    jz .parsed
    mov edi, val_poll
    call token_equals
    jnc .parsed
    mov edi, val_hlt
    call token_equals
    jc .bad_wait
    mov dword [hlt_mode], 1
.parsed:
    call find_device
    test eax, eax
    jz .no_device
    mov [mmio], eax
    call init_device                ; CF on failure, ESI = message
    jc .error
    call prepare                    ; CF on failure, ESI = message
    jc .error

    ; blkbench: device=0x... capacity=N mode=M rounds=N depth=N size=N
    mov esi, msg_prefix
    call serial_puts
    mov esi, msg_device
    call serial_puts
    mov eax, [mmio]
    call serial_put_hex32
    mov esi, msg_cap
    call serial_puts
    mov eax, [capacity]
    call serial_put_dec
    mov esi, msg_mode
    call serial_puts
    mov esi, val_seq
    cmp dword [rand_mode], 0
    je .say_mode
    mov esi, val_rand
.say_mode:
    call serial_puts
    mov esi, msg_rounds
    call serial_puts
    mov eax, [rounds]
    call serial_put_dec
    mov esi, msg_depth
    call serial_puts
    mov eax, DEPTH
    call serial_put_dec
    mov esi, msg_size
    call serial_puts
    mov eax, [size]
    call serial_put_dec
    call serial_newline

    cmp dword [hlt_mode], 0
    je .no_timer
    call start_timer
.no_timer:
    mov ebp, [rounds]               ; rounds left
    xor ebx, ebx                    ; header image offset of this round
    mov esi, msg_prefix
    call serial_puts
    mov esi, msg_start
    call serial_puts
    call serial_newline                    ; the host starts its clock on this line
    test ebp, ebp
    jz .timed_done
    mov edx, [mmio]
    xor eax, eax                    ; AX = avail idx = used idx expected
align 16
.round:
    lea esi, [HDRIMG + ebx]
    mov edi, HDR
    mov ecx, DEPTH * 4
    rep movsd                       ; this round's headers
    add ax, DEPTH
    mov [AVAIL + 2], ax             ; publish DEPTH chains (the ring entries are fixed)
    mov dword [edx + 0x050], 0      ; QueueNotify
.poll:
    cmp [USED + 2], ax
    je .round_done
    cmp dword [hlt_mode], 0
    je .poll
    sti                             ; the interrupt shadow keeps the tick until after hlt
    hlt                             ; the handler resumes at .poll
    cli
    jmp .poll
.round_done:
    add ebx, DEPTH * 16
    cmp ebx, [nrounds]
    jb .next
    xor ebx, ebx
.next:
    dec ebp
    jnz .round
.timed_done:
    mov dword [LAPIC + LAPIC_LVT_TIMER], 0x10000    ; mask the timer again
    mov esi, msg_prefix
    call serial_puts
    mov esi, msg_done
    call serial_puts                       ; the host stops its clock at this line
    mov edi, STATUS                 ; every status of the last round must be OK (0)
    mov ecx, DEPTH
    xor eax, eax
    repe scasb
    mov esi, msg_ok
    je .say_status
    mov esi, msg_bad
.say_status:
    call serial_puts
    call serial_newline
    jmp reset

.bad_magic:
    mov esi, err_magic
    jmp .error
.bad_mode:
    mov esi, err_mode
    jmp .error
.bad_number:
    mov esi, err_num
    jmp .error
.bad_wait:
    mov esi, err_wait
    jmp .error
.no_device:
    mov esi, err_nodev
.error:
    push esi
    mov esi, msg_prefix
    call serial_puts
    pop esi
    call serial_puts
    call serial_newline

    RESET

; start_timer: IDT entries for the timer and spurious vectors, then the local APIC
; enabled with a periodic timer every TICK_NS. Interrupts stay off (IF = 0) except
; across the `sti; hlt` of the wait.
start_timer:
    mov eax, timer_isr
    mov edi, idt + TIMER_VECTOR * 8
    call set_gate
    mov eax, spurious_isr
    mov edi, idt + SPURIOUS_VECTOR * 8
    call set_gate
    lidt [idt_desc]
    mov dword [LAPIC + LAPIC_SVR], 0x100 | SPURIOUS_VECTOR
    mov dword [LAPIC + LAPIC_TIMER_DIV], 0x0B               ; divide by 1
    mov dword [LAPIC + LAPIC_LVT_TIMER], (1 << 17) | TIMER_VECTOR   ; periodic
    mov dword [LAPIC + LAPIC_TIMER_INIT], TICK_NS
    ret

; set_gate: EAX = handler, EDI = IDT entry: a 32-bit interrupt gate in the code segment.
set_gate:
    mov word [edi + 0], ax
    mov word [edi + 2], 0x08
    mov word [edi + 4], 0x8E00
    shr eax, 16
    mov word [edi + 6], ax
    ret

; The handlers never return with iret: KVM's instruction emulator, which runs this
; kernel-mode code on a PVM host, executes iret only in real mode. An interrupt can only
; arrive in the `sti; hlt` of the wait (IF is clear everywhere else), so each handler
; drops its frame (EIP, CS, EFLAGS: IF stays clear, as after the `cli`) and goes back to
; polling.
timer_isr:
    mov dword [LAPIC + LAPIC_EOI], 0
spurious_isr:                       ; (no EOI for a spurious interrupt)
    add esp, 12
    jmp pvh_entry.poll

; find_device: EAX = base of the first virtio-blk window found, or 0.
find_device:
    push ecx
    push edx
    mov edx, ISO_BASE
    mov ecx, ISO_COUNT
.iso:
    call is_blk
    je .found
    add edx, ISO_STRIDE
    loop .iso
    mov edx, QEMU_BASE
    mov ecx, QEMU_COUNT
.qemu:
    call is_blk
    je .found
    add edx, QEMU_STRIDE
    loop .qemu
    xor eax, eax
    jmp .out
.found:
    mov eax, edx
.out:
    pop edx
    pop ecx
    ret

; is_blk: EDX = window. ZF = 1 when it holds a modern virtio-blk device.
is_blk:
    cmp dword [edx + 0x000], VIRTIO_MAGIC
    jne .no
    cmp dword [edx + 0x004], 2
    jne .no
    cmp dword [edx + 0x008], 2
.no:
    ret

; init_device: §3.1.1 with VIRTIO_F_VERSION_1 only; queue 0 of QSIZE entries.
; CF = 1 and ESI = message on failure.
init_device:
    mov edx, [mmio]
    mov dword [edx + 0x070], 0
    mov dword [edx + 0x070], 1
    mov dword [edx + 0x070], 3
    mov dword [edx + 0x024], 0
    mov dword [edx + 0x020], 0
    mov dword [edx + 0x024], 1
    mov dword [edx + 0x020], 1
    mov dword [edx + 0x070], 0x0B
    test dword [edx + 0x070], 0x08
    jz .refused
    mov eax, [edx + 0x100]          ; capacity (sectors), low half
    mov [capacity], eax
    mov dword [edx + 0x030], 0
    cmp dword [edx + 0x034], QSIZE
    jb .qmax
    mov dword [edx + 0x038], QSIZE
    mov dword [edx + 0x080], DESC
    mov dword [edx + 0x084], 0
    mov dword [edx + 0x090], AVAIL
    mov dword [edx + 0x094], 0
    mov dword [edx + 0x0A0], USED
    mov dword [edx + 0x0A4], 0
    mov dword [edx + 0x044], 1
    mov dword [edx + 0x070], 0x0F
    clc
    ret
.refused:
    mov esi, err_feat
    stc
    ret
.qmax:
    mov esi, err_qmax
    stc
    ret

; prepare: descriptor table, available ring, header images. CF + ESI on failure.
prepare:
    mov dword [size], SEQ_SIZE
    cmp dword [rand_mode], 0
    je .sized
    mov dword [size], RAND_SIZE
.sized:
    ; descriptors: 3i header -> 3i+1 data -> 3i+2 status
    xor ecx, ecx
    mov edi, DESC
.desc:
    mov eax, ecx
    shl eax, 4
    add eax, HDR
    mov [edi + 0], eax              ; header
    mov dword [edi + 4], 0
    mov dword [edi + 8], 16
    lea eax, [ecx * 3 + 1]
    shl eax, 16
    or eax, 1                       ; flags NEXT, next = 3i+1
    mov [edi + 12], eax
    mov eax, ecx
    imul eax, [size]
    add eax, DATA
    mov [edi + 16], eax             ; data
    mov dword [edi + 20], 0
    mov eax, [size]
    mov [edi + 24], eax
    lea eax, [ecx * 3 + 2]
    shl eax, 16
    or eax, 3                       ; NEXT | WRITE, next = 3i+2
    mov [edi + 28], eax
    lea eax, [STATUS + ecx]
    mov [edi + 32], eax             ; status
    mov dword [edi + 36], 0
    mov dword [edi + 40], 1
    mov dword [edi + 44], 2         ; WRITE
    add edi, 48
    inc ecx
    cmp ecx, DEPTH
    jne .desc
    ; available ring: flags = NO_INTERRUPT, idx = 0, ring[j] = 3 * (j mod DEPTH)
    mov word [AVAIL + 0], 1
    mov word [AVAIL + 2], 0
    xor ecx, ecx
.ring:
    mov eax, ecx
    and eax, DEPTH - 1
    lea eax, [eax * 3]
    mov [AVAIL + 4 + ecx * 2], ax
    inc ecx
    cmp ecx, QSIZE
    jne .ring
    ; header images: rounds of DEPTH headers, type IN (0)
    mov eax, [size]
    shr eax, 9                      ; sectors per request
    mov esi, eax
    mov eax, [capacity]
    xor edx, edx
    div esi                         ; EAX = requests that fit the disk
    cmp eax, DEPTH
    jb .small
    mov ebx, eax                    ; EBX = slots on the disk (seq: count; rand: range)
    mov dword [seed], 0x2545F491
    xor ecx, ecx                    ; request number
    mov edi, HDRIMG
.hdr:
    cmp dword [rand_mode], 0
    jne .random
    mov eax, ecx                    ; seq: request k reads slot k mod slots
    xor edx, edx
    div ebx
    mov eax, edx
    jmp .slot
.random:
    mov eax, [seed]                 ; xorshift32
    mov edx, eax
    shl edx, 13
    xor eax, edx
    mov edx, eax
    shr edx, 17
    xor eax, edx
    mov edx, eax
    shl edx, 5
    xor eax, edx
    mov [seed], eax
    xor edx, edx
    div ebx
    mov eax, edx
.slot:
    mul esi                         ; sector = slot * sectors per request
    mov dword [edi + 0], 0          ; VIRTIO_BLK_T_IN
    mov dword [edi + 4], 0
    mov [edi + 8], eax
    mov [edi + 12], edx
    add edi, 16
    inc ecx
    cmp ecx, DEPTH * MAX_ROUNDS
    jne .hdr
    ; seq: as many distinct rounds as the disk holds (at most MAX_ROUNDS) so that
    ; wrapping stays sequential; rand: all of them.
    mov eax, MAX_ROUNDS
    cmp dword [rand_mode], 0
    jne .count
    mov eax, ebx
    shr eax, 6                      ; slots / DEPTH whole rounds
    cmp eax, MAX_ROUNDS
    jbe .count
    mov eax, MAX_ROUNDS
.count:
    shl eax, 10                     ; * DEPTH * 16 bytes
    mov [nrounds], eax
    clc
    ret
.small:
    mov esi, err_small
    stc
    ret

%include "cmdline_tokens.inc"
%include "serial_out.inc"
