; exitloop.asm - a PVH guest that measures a VMM's exit round trip (bench/exits.py).
;
; Assemble with `nasm -f elf32 -I guests/include/` (pvh_bare.inc, cmdline_tokens.inc,
; serial_out.inc), link with `ld -m elf_i386 -T bench/guests/exitloop.ld` (loaded at
; 1 MiB, PVH note in a PT_NOTE).
;
; Command line (hvm_start_info.cmdline_paddr), space-separated tokens, all optional:
;   mode=pio|mmio   pio: `in al, dx` from an unclaimed port; mmio: a 4-byte read from an
;                   unmapped guest-physical address in the 32-bit MMIO hole (default pio)
;   n=<count>       round trips to perform (default 20000; 0 is allowed)
;   port=<num>      the port for mode=pio   (default 0x0700)
;   addr=<num>      the address for mode=mmio (default 0xD8000000)
; Numbers are decimal or 0x-prefixed hex.
;
; Output on COM1 (0x3F8), each line ending CR LF:
;   exitloop: mode=pio n=20000 target=0x00000700
;   exitloop: start
;   exitloop: done last=0x000000ff
; `last` is the value the final read returned (0xff / 0xffffffff / 0 depending on how the
; VMM answers an unclaimed access). Errors print `exitloop: error <what>` instead of start.
; Then the guest resets: i8042 (out 0x64, 0xFE); if that returns (QEMU microvm has no
; i8042) it triple-faults through a zero-limit IDT with ud2 (on this host's PVM an int3
; through an empty IDT is an emulation failure that hangs QEMU; ud2 faults properly).
;
; Why these targets: in QEMU microvm (-nodefaults, isa-serial=on) the claimed ports are
; COM1 0x3F8-0x3FF, RTC 0x70-0x71, fw_cfg 0x510-0x51B (so not the 0x510 one might guess),
; plus the in-kernel PIC (0x20, 0xA0, 0x4D0), PIT (0x40-0x43, 0x61) that never reach
; userspace; port 0x80 is special-cased by some hosts. Port 0x700 is claimed by nobody
; and exits to userspace in both VMMs. For MMIO, microvm maps RAM below 0xC0000000 (here
; 64 MiB), ACPI GED at 0xFEA00000, virtio-mmio at 0xFEB00000+, IOAPIC/LAPIC at
; 0xFEC00000/0xFEE00000; isovisor puts virtio-mmio at 0xD0000000+ (4 KiB each).
; 0xD8000000 is unmapped in both, so every read is a KVM_EXIT_MMIO to the VMM.
;
; The guest's kernel-mode code is interpreted on a PVM host (~1 us per instruction),
; so the measured loop is three instructions: the access, dec, jnz.

bits 32

%include "pvh_bare.inc"



DEFAULT_N    equ 20000
DEFAULT_PORT equ 0x0700
DEFAULT_ADDR equ 0xD8000000
CMDLINE_MAX  equ 1024               ; bytes of the command line looked at

MODE_PIO    equ 0
MODE_MMIO   equ 1

; ---------------------------------------------------------------------------
PVH_NOTE

; ---------------------------------------------------------------------------
section .rodata
FLAT_GDT

key_mode:   db "mode=", 0
key_n:      db "n=", 0
key_port:   db "port=", 0
key_addr:   db "addr=", 0
val_pio:    db "pio", 0
val_mmio:   db "mmio", 0

msg_prefix: db "exitloop: ", 0
msg_mode:   db "mode=", 0
msg_n:      db " n=", 0
msg_target: db " target=", 0
msg_start:  db "start", 0
msg_done:   db "done last=", 0
msg_magic:  db "error bad hvm_start_info magic", 0
msg_badmode: db "error mode must be pio or mmio", 0
msg_badnum: db "error bad number in n=, port= or addr=", 0
msg_badport: db "error port must be below 0x10000", 0

; ---------------------------------------------------------------------------
section .bss
alignb 16
stack:      resb 4096
stack_top:
cmdline:    resd 1                  ; physical address of the command line, 0 if none
mode:       resd 1
count:      resd 1
port:       resd 1
addr:       resd 1
last:       resd 1

; ---------------------------------------------------------------------------
section .text
global pvh_entry
pvh_entry:
    ENTER_FLAT

    mov dword [mode], MODE_PIO
    mov dword [count], DEFAULT_N
    mov dword [port], DEFAULT_PORT
    mov dword [addr], DEFAULT_ADDR

    READ_START_INFO

    ; mode=
    mov esi, key_mode
    call find_key                   ; ESI = value or 0
    test esi, esi
    jz .mode_done
    mov edi, val_pio
    call token_equals
    jnc .mode_done                  ; MODE_PIO already
    mov edi, val_mmio
    call token_equals
    jc .bad_mode
    mov dword [mode], MODE_MMIO
.mode_done:
    mov esi, key_n
    call find_key
    test esi, esi
    jz .n_done
    call parse_number
    jc .bad_number
    mov [count], eax
.n_done:
    mov esi, key_port
    call find_key
    test esi, esi
    jz .port_done
    call parse_number
    jc .bad_number
    cmp eax, 0x10000
    jae .bad_port
    mov [port], eax
.port_done:
    mov esi, key_addr
    call find_key
    test esi, esi
    jz .parsed
    call parse_number
    jc .bad_number
    mov [addr], eax
.parsed:

    ; exitloop: mode=pio n=20000 target=0x00000700
    mov esi, msg_prefix
    call serial_puts
    mov esi, msg_mode
    call serial_puts
    mov esi, val_pio
    cmp dword [mode], MODE_PIO
    je .say_mode
    mov esi, val_mmio
.say_mode:
    call serial_puts
    mov esi, msg_n
    call serial_puts
    mov eax, [count]
    call serial_put_dec
    mov esi, msg_target
    call serial_puts
    mov eax, [port]
    cmp dword [mode], MODE_PIO
    je .say_target
    mov eax, [addr]
.say_target:
    call serial_put_hex32
    call serial_newline

    ; Load the loop's registers before the start line so that nothing but the loop and
    ; the done line lies between the two timestamps the host takes.
    mov ecx, [count]
    mov edx, [port]
    mov ebx, [addr]
    xor eax, eax
    mov esi, msg_prefix
    call serial_puts
    mov esi, msg_start
    call serial_puts
    call serial_newline                    ; the host starts its clock on this line

    test ecx, ecx
    jz .loop_done
    cmp dword [mode], MODE_PIO
    jne .mmio_loop
align 16
.pio_loop:
    in al, dx
    dec ecx
    jnz .pio_loop
    jmp .loop_done
align 16
.mmio_loop:
    mov eax, [ebx]
    dec ecx
    jnz .mmio_loop
.loop_done:
    mov [last], eax
    cmp dword [mode], MODE_PIO
    jne .say_done
    and dword [last], 0xFF
.say_done:
    mov esi, msg_prefix
    call serial_puts
    mov esi, msg_done
    call serial_puts
    mov eax, [last]
    call serial_put_hex32
    call serial_newline                    ; the host stops its clock on this line
    jmp reset

.bad_magic:
    mov esi, msg_magic
    jmp .error
.bad_mode:
    mov esi, msg_badmode
    jmp .error
.bad_number:
    mov esi, msg_badnum
    jmp .error
.bad_port:
    mov esi, msg_badport
.error:
    push esi
    mov esi, msg_prefix
    call serial_puts
    pop esi
    call serial_puts
    call serial_newline
    ; fall through

    RESET

%include "cmdline_tokens.inc"
%include "serial_out.inc"
