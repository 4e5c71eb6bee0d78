; irq.asm - legacy timer interrupts: 8259 PIC + 8254 PIT, delivered through hlt.
;
; Steps:
;   1. build a 256-entry IDT (our GDT from pvh.inc is already loaded): vectors 0-31
;      report an unexpected exception and end the guest; 0x20 counts timer ticks;
;      0x21-0x2f acknowledge other PIC lines; 0x40 is the watchdog; the rest iret;
;   2. remap the PICs (master to vectors 0x20-0x27, slave 0x28-0x2f), unmask IRQ0 only;
;   3. program PIT channel 0 as a rate generator at ~100 Hz (divisor 11932);
;   4. software-enable the local APIC, set LINT0 to ExtINT (as a BIOS leaves it: that is
;      how the PIC's output reaches the CPU), and start the APIC timer as a periodic
;      watchdog (vector 0x40) so hlt always wakes up even if the PIT never fires;
;   5. `sti; hlt` in a loop until 10 timer interrupts have arrived (each one EOIed at
;      the PIC), or until a TSC deadline of 2^33 ticks (2-4 s).
;
; Returning from a handler: KVM's instruction emulator implements IRET only in real
; mode (this PVM host also handles 64-bit IRETQ, which Linux needs, but not a 32-bit
; IRET: it is an "emulation failure"). So by default the handlers return without it,
; rewriting the frame [EIP, CS, EFLAGS] into [EFLAGS, EIP] and ending with
; `popfd; ret` (same CS, same privilege, same stack: exactly what IRET would do here).
; The command line token `iret=1` makes them use a real IRET, for a VMM that assists it
; or a host that runs guest kernel code in hardware.
; Prints one of:
;   irq: 10 timer interrupts
;   irq: timeout (<k> timer interrupts)
;   irq: unexpected exception <vector>      (then ends at once)
; then resets.

%include "pvh.inc"

TARGET_TICKS    equ 10

PIC1_CMD        equ 0x20
PIC1_DATA       equ 0x21
PIC2_CMD        equ 0xA0
PIC2_DATA       equ 0xA1
PIC_EOI         equ 0x20

PIT_CH0         equ 0x40
PIT_MODE        equ 0x43
PIT_DIVISOR     equ 11932           ; 1193182 Hz / 11932 = 100.0 Hz

LAPIC           equ 0xFEE00000
LAPIC_EOI       equ LAPIC + 0x0B0
LAPIC_SVR       equ LAPIC + 0x0F0
LAPIC_LVT_TIMER equ LAPIC + 0x320
LAPIC_LVT_LINT0 equ LAPIC + 0x350
LAPIC_TMR_INIT  equ LAPIC + 0x380
LAPIC_TMR_DIV   equ LAPIC + 0x3E0
WATCHDOG_VECTOR equ 0x40

section .bss
alignb 8
idt:        resq 256
ticks:      resd 1                  ; timer interrupts seen (written by the handler)
use_iret:   resd 1                  ; iret=1 on the command line: return with IRET

; End of an interrupt handler, the handler's own registers already restored.
%macro IRQ_RETURN 0
    cmp dword [use_iret], 0         ; (flags are restored below either way)
    je %%soft
    iret
%%soft:
    push eax                        ; stack: EAX, EIP, CS, EFLAGS
    mov eax, [esp + 4]              ; EAX = EIP
    xchg eax, [esp + 12]            ; EIP into the EFLAGS slot, EAX = EFLAGS
    mov [esp + 8], eax              ; EFLAGS into the CS slot
    pop eax                         ; stack: EIP (stale), EFLAGS, EIP
    add esp, 4                      ; stack: EFLAGS, EIP
    popfd                           ; flags back, IF included ...
    ret                             ; ... and resume the interrupted instruction
%endmacro

section .rodata
key_iret:   db "iret=", 0
align 4
idt_desc:
    dw 256 * 8 - 1
    dd idt

section .text
main:
    mov esi, key_iret
    xor eax, eax
    call cmdline_get_uint
    mov [use_iret], eax

    ; --- 1. IDT: every vector first gets the do-nothing handler ...
    xor ecx, ecx
.fill:
    mov eax, ignore_handler
    call set_gate
    inc ecx
    cmp ecx, 256
    jb .fill
    ; ... then the exception stubs (0-31) ...
    xor ecx, ecx
.exceptions:
    mov eax, [exception_stubs + ecx * 4]
    call set_gate
    inc ecx
    cmp ecx, 32
    jb .exceptions
    ; ... and the PIC and watchdog vectors.
    mov ecx, 0x20
    mov eax, timer_handler
    call set_gate
.pic1:
    inc ecx
    mov eax, pic1_handler
    call set_gate
    cmp ecx, 0x27
    jb .pic1
.pic2:
    inc ecx
    mov eax, pic2_handler
    call set_gate
    cmp ecx, 0x2f
    jb .pic2
    mov ecx, WATCHDOG_VECTOR
    mov eax, watchdog_handler
    call set_gate
    lidt [idt_desc]

    ; --- 2. PIC: ICW1 (edge, cascade, ICW4 follows), ICW2 (vector base),
    ;        ICW3 (slave on IRQ2 / slave id 2), ICW4 (8086 mode), then masks.
    mov al, 0x11
    out PIC1_CMD, al
    out PIC2_CMD, al
    mov al, 0x20
    out PIC1_DATA, al
    mov al, 0x28
    out PIC2_DATA, al
    mov al, 0x04
    out PIC1_DATA, al
    mov al, 0x02
    out PIC2_DATA, al
    mov al, 0x01
    out PIC1_DATA, al
    out PIC2_DATA, al
    mov al, 0xFE                    ; master: only IRQ0 (the PIT) unmasked
    out PIC1_DATA, al
    mov al, 0xFF                    ; slave: everything masked
    out PIC2_DATA, al

    ; --- 3. PIT channel 0: lobyte/hibyte access, mode 2 (rate generator), binary.
    mov al, 0x34
    out PIT_MODE, al
    mov al, PIT_DIVISOR & 0xFF
    out PIT_CH0, al
    mov al, PIT_DIVISOR >> 8
    out PIT_CH0, al

    ; --- 4. Local APIC: enable (spurious vector 0xFF), LINT0 = ExtINT unmasked,
    ;        timer periodic on the watchdog vector, divide by 16, ~17 ms at a 1 GHz
    ;        APIC bus (KVM's), longer on real hardware: it only has to wake hlt.
    mov dword [LAPIC_SVR], 0x1FF
    mov dword [LAPIC_LVT_LINT0], 0x700
    mov dword [LAPIC_TMR_DIV], 0x3
    mov dword [LAPIC_LVT_TIMER], 0x20000 | WATCHDOG_VECTOR
    mov dword [LAPIC_TMR_INIT], 0x100000

    ; --- 5. Wait for the ticks with interrupts on.
    mov cl, 33
    call tsc_set_deadline
    sti
.wait:
    hlt                             ; sleeps until the next interrupt
    cmp dword [ticks], TARGET_TICKS
    jae .done
    call tsc_expired
    jc .timeout
    jmp .wait

.done:
    call quiesce
    PRINT "irq: "
    mov eax, TARGET_TICKS
    call serial_put_dec
    PRINTLN " timer interrupts"
    ret

.timeout:
    call quiesce
    PRINT "irq: timeout ("
    mov eax, [ticks]
    call serial_put_dec
    PRINTLN " timer interrupts)"
    ret

; Interrupts off, every PIC line masked, APIC timer stopped.
quiesce:
    cli
    mov al, 0xFF
    out PIC1_DATA, al
    out PIC2_DATA, al
    mov dword [LAPIC_TMR_INIT], 0
    mov dword [LAPIC_LVT_TIMER], 0x10000 | WATCHDOG_VECTOR ; masked
    ret

; set_gate: IDT entry ECX = 32-bit interrupt gate (ring 0, present) to EAX.
set_gate:
    push edx
    lea edx, [idt + ecx * 8]
    mov [edx], ax                   ; offset 15..0
    mov word [edx + 2], GDT_CODE32  ; selector
    mov word [edx + 4], 0x8E00      ; present, DPL 0, 32-bit interrupt gate
    push eax
    shr eax, 16
    mov [edx + 6], ax               ; offset 31..16
    pop eax
    pop edx
    ret

; --- Handlers --------------------------------------------------------------

timer_handler:                      ; IRQ0: count, EOI the master PIC
    push eax
    inc dword [ticks]
    mov al, PIC_EOI
    out PIC1_CMD, al
    pop eax
    IRQ_RETURN

pic1_handler:                       ; IRQ1-7 (masked; IRQ7 may come spuriously)
    push eax
    mov al, PIC_EOI
    out PIC1_CMD, al
    pop eax
    IRQ_RETURN

pic2_handler:                       ; IRQ8-15 (masked): EOI slave then master
    push eax
    mov al, PIC_EOI
    out PIC2_CMD, al
    out PIC1_CMD, al
    pop eax
    IRQ_RETURN

watchdog_handler:                   ; APIC timer: just wake hlt
    mov dword [LAPIC_EOI], 0
    IRQ_RETURN

ignore_handler:                     ; anything else (e.g. APIC spurious 0xFF)
    IRQ_RETURN

; Exceptions 0-31: one stub each pushes its vector number, then report and end.
%assign vec 0
%rep 32
exception_stub_ %+ vec:
    push dword vec
    jmp exception_common
%assign vec vec + 1
%endrep

exception_common:
    cli
    pop eax                         ; vector (an error code, if any, lies beneath)
    mov esp, stack_top              ; whatever state we were in, use a sane stack
    PRINT "irq: unexpected exception "
    call serial_put_dec
    call serial_newline
    jmp guest_reset

section .rodata
align 4
exception_stubs:
%assign vec 0
%rep 32
    dd exception_stub_ %+ vec
%assign vec vec + 1
%endrep
