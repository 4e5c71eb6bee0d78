/*
 * pvh-spec-guest: 32-bit entry stub.
 *
 * Written from the public PVH boot ABI only (Xen docs/misc/pvh.pandoc,
 * xen/include/public/elfnote.h, xen/include/public/arch-x86/hvm/start_info.h).
 *
 * Machine state promised on entry (pvh.pandoc): EBX = physical address of
 * struct hvm_start_info; CR0.PE = 1 and every other writable CR0 bit clear;
 * CR4 = 0; CS flat 32-bit code; DS and ES flat 32-bit data; TR a 32-bit TSS;
 * EFLAGS.VM/IF/TF clear.  SS, FS, GS and ESP are NOT promised, so nothing
 * below touches the stack (or SS) before our own GDT and stack are loaded.
 * GNU as, AT&T syntax.
 */

#define XEN_ELFNOTE_PHYS32_ENTRY 18

	.code32

/* ---- ELF note: name "Xen", type PHYS32_ENTRY, desc = 32-bit entry ---- */
	.section .note.Xen, "a", @note
	.balign 4
	.long 2f - 1f                   /* namesz (includes NUL) */
	.long 4f - 3f                   /* descsz */
	.long XEN_ELFNOTE_PHYS32_ENTRY  /* type */
1:	.asciz "Xen"
2:	.balign 4
3:	.long pvh_entry                 /* physical entry point */
4:	.balign 4

/* ---- entry ---- */
	.section .text.entry, "ax", @progbits
	.globl pvh_entry
	.type pvh_entry, @function
pvh_entry:
	/* Only DS-relative stores until the stack exists (DS is promised flat). */
	movl %ebx, entry_ebx
	movl %cr0, %eax
	movl %eax, entry_cr0
	movl %cr4, %eax
	movl %eax, entry_cr4

	lgdt gdt_desc
	ljmp $0x08, $1f
1:	movw $0x10, %ax
	movw %ax, %ds
	movw %ax, %es
	movw %ax, %ss
	movw %ax, %fs
	movw %ax, %gs
	movl $stack_top, %esp

	/* None of the instructions above modify EFLAGS, so this is the entry value. */
	pushfl
	popl %eax
	movl %eax, entry_eflags
	cld

	call guest_main                 /* never returns */
	jmp guest_reset
	.size pvh_entry, . - pvh_entry

/* Reset: keyboard-controller pulse, then a deliberate triple fault. */
	.globl guest_reset
	.type guest_reset, @function
guest_reset:
	cli
	movb $0xfe, %al
	outb %al, $0x64
	lidt null_idt                   /* limit 0: every vector is out of range */
	/*
	 * Raise an exception through the empty IDT: #UD -> #GP -> #DF -> triple
	 * fault.  ud2 rather than a software "int n": on the development host's
	 * KVM (which emulates guest kernel code) int3 / int $0x80 stop the VM with
	 * "KVM internal error ... emulation failure" instead of faulting.
	 */
	ud2
	int $3                          /* not reached; second attempt */
2:	hlt
	jmp 2b
	.size guest_reset, . - guest_reset

	.section .rodata, "a", @progbits
	.balign 8
gdt:
	.quad 0                         /* 0x00 null */
	.quad 0x00cf9a000000ffff        /* 0x08 code: base 0, limit 4G, 32-bit, r/x */
	.quad 0x00cf92000000ffff        /* 0x10 data: base 0, limit 4G, 32-bit, r/w */
gdt_end:
	.balign 4
	.word 0
gdt_desc:
	.word gdt_end - gdt - 1
	.long gdt
	.balign 4
	.word 0
null_idt:
	.word 0
	.long 0

	.section .bss, "aw", @nobits
	.balign 4
	.globl entry_ebx, entry_cr0, entry_cr4, entry_eflags
entry_ebx:	.long 0
entry_cr0:	.long 0
entry_cr4:	.long 0
entry_eflags:	.long 0
	.balign 16
stack:	.skip 8192
stack_top:

	.section .note.GNU-stack, "", @progbits
