/*
 * pvh-spec-guest: reads struct hvm_start_info and reports it on COM1.
 *
 * Written from the public PVH boot ABI only (Xen docs/misc/pvh.pandoc and
 * xen/include/public/arch-x86/hvm/start_info.h); see README.md.
 * Freestanding C, i386, no libc and no libgcc (so no 64-bit division).
 */
typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

_Static_assert(sizeof(u64) == 8 && sizeof(u32) == 4, "i386 types");

/* ---- start_info.h layout (all fields little endian) ---- */
#define HVM_START_MAGIC 0x336ec578u
#define MEMMAP_TYPE_RAM 1u

struct start_info {            /* offsets per start_info.h */
	u32 magic;                 /*  0 */
	u32 version;               /*  4 */
	u32 flags;                 /*  8 */
	u32 nr_modules;            /* 12 */
	u64 modlist_paddr;         /* 16 */
	u64 cmdline_paddr;         /* 24 */
	u64 rsdp_paddr;            /* 32 */
	u64 memmap_paddr;          /* 40, version >= 1 */
	u32 memmap_entries;        /* 48, version >= 1 */
	u32 reserved;              /* 52, version >= 1 */
} __attribute__((packed));     /* 56 */

struct mod_entry {
	u64 paddr;
	u64 size;
	u64 cmdline_paddr;
	u64 reserved;
} __attribute__((packed));

struct memmap_entry {
	u64 addr;
	u64 size;
	u32 type;
	u32 reserved;
} __attribute__((packed));

_Static_assert(sizeof(struct start_info) == 56, "start_info size");
_Static_assert(sizeof(struct mod_entry) == 32, "modlist entry size");
_Static_assert(sizeof(struct memmap_entry) == 24, "memmap entry size");

/* Loop caps keep a hostile or broken start_info from hanging the guest. */
#define MAX_CMDLINE 1024u
#define MAX_MODULES 16u
#define MAX_MEMMAP 128u

/* Set by start.S before anything else runs. */
extern u32 entry_ebx, entry_cr0, entry_cr4, entry_eflags;
extern void guest_reset(void) __attribute__((noreturn));
void guest_main(void) __attribute__((noreturn));

/* ---- COM1 ---- */
#define COM1 0x3f8u

static inline void outb(u16 port, u8 v)
{
	__asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port));
}

static inline u8 inb(u16 port)
{
	u8 v;
	__asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}

static void uart_init(void)
{
	outb(COM1 + 1, 0x00);      /* IER: no interrupts */
	outb(COM1 + 3, 0x80);      /* LCR: DLAB */
	outb(COM1 + 0, 0x01);      /* DLL: 115200 */
	outb(COM1 + 1, 0x00);      /* DLM */
	outb(COM1 + 3, 0x03);      /* LCR: 8N1, DLAB off */
}

static void putc(char c)
{
	while (!(inb(COM1 + 5) & 0x20))   /* LSR.THRE */
		;
	outb(COM1, (u8)c);
}

static void puts(const char *s)
{
	while (*s)
		putc(*s++);
}

static const char hexdig[] = "0123456789abcdef";

static void put_hex8(u8 b)
{
	putc(hexdig[b >> 4]);
	putc(hexdig[b & 15]);
}

/* "0x" followed by the value, without leading zeros beyond 8 digits. */
static void put_hex(u64 v)
{
	int shift = (v >> 32) ? 60 : 28;

	puts("0x");
	for (; shift >= 0; shift -= 4)
		putc(hexdig[(u32)(v >> shift) & 15]);
}

/* Decimal without 64-bit division: subtract powers of ten. */
static const u64 pow10[] = {
	10000000000000000000ull, 1000000000000000000ull, 100000000000000000ull,
	10000000000000000ull, 1000000000000000ull, 100000000000000ull,
	10000000000000ull, 1000000000000ull, 100000000000ull, 10000000000ull,
	1000000000ull, 100000000ull, 10000000ull, 1000000ull, 100000ull,
	10000ull, 1000ull, 100ull, 10ull, 1ull,
};

static void put_dec(u64 v)
{
	int started = 0;

	for (unsigned i = 0; i < sizeof(pow10) / sizeof(pow10[0]); i++) {
		char d = '0';
		while (v >= pow10[i]) {
			v -= pow10[i];
			d++;
		}
		if (d != '0' || started || pow10[i] == 1) {
			putc(d);
			started = 1;
		}
	}
}

#define P "pvh-spec-guest: "

/* Paging is off, so only the low 4 GiB is addressable. 0 means "not present". */
static int reachable(u64 paddr)
{
	return paddr != 0 && (paddr >> 32) == 0;
}

static const void *phys(u64 paddr)
{
	return (const void *)(u32)paddr;
}

static void report_entry_state(void)
{
	/* pvh.pandoc: CR0.PE set, all other writable bits clear (ET, bit 4, is
	 * read-only on P6 and later, so it is ignored); CR4 all clear; EFLAGS
	 * VM (17), IF (9), TF (8) clear. */
	int ok = (entry_cr0 & ~0x10u) == 0x1u && entry_cr4 == 0 &&
		 (entry_eflags & ((1u << 17) | (1u << 9) | (1u << 8))) == 0;

	puts(P "entry cr0=");
	put_hex(entry_cr0);
	puts(" cr4=");
	put_hex(entry_cr4);
	puts(" eflags=");
	put_hex(entry_eflags);
	puts(ok ? " state=ok\n" : " state=violation\n");
}

static void report_cmdline(const struct start_info *si)
{
	puts(P "cmdline=");
	if (!reachable(si->cmdline_paddr)) {
		puts(si->cmdline_paddr ? "(above 4GiB)\n" : "(none)\n");
		return;
	}
	const char *s = phys(si->cmdline_paddr);
	putc('"');
	for (u32 i = 0; i < MAX_CMDLINE && s[i]; i++)
		putc(s[i]);
	puts("\"\n");
}

static void report_memmap(const struct start_info *si)
{
	u32 n = si->memmap_entries;
	u64 ram = 0;

	/* start_info.h: the map is optional; check memmap_entries first. */
	if (n && reachable(si->memmap_paddr)) {
		const struct memmap_entry *e = phys(si->memmap_paddr);
		for (u32 i = 0; i < n && i < MAX_MEMMAP; i++)
			if (e[i].type == MEMMAP_TYPE_RAM)
				ram += e[i].size;
	}
	puts(P "memmap entries=");
	put_dec(n);
	puts(" ram_kib=");
	put_dec(ram >> 10);
	putc('\n');
}

static void report_modules(const struct start_info *si)
{
	u32 n = si->nr_modules;

	puts(P "modules=");
	put_dec(n);
	putc('\n');
	if (!n || !reachable(si->modlist_paddr))
		return;

	const struct mod_entry *m = phys(si->modlist_paddr);
	for (u32 i = 0; i < n && i < MAX_MODULES; i++) {
		puts(P "module ");
		put_dec(i);
		puts(" size=");
		put_dec(m[i].size);
		puts(" first8=");
		if (!reachable(m[i].paddr)) {
			puts("(unreachable)\n");
			continue;
		}
		const u8 *b = phys(m[i].paddr);
		for (u32 j = 0; j < 8 && j < m[i].size; j++)
			put_hex8(b[j]);
		putc('\n');
	}
}

static void report_rsdp(const struct start_info *si)
{
	puts(P "rsdp=");
	if (!si->rsdp_paddr) {
		puts("0\n");
		return;
	}
	put_hex(si->rsdp_paddr);
	putc('\n');
	if (reachable(si->rsdp_paddr)) {
		const char *sig = phys(si->rsdp_paddr);
		const char *want = "RSD PTR ";
		int ok = 1;
		for (int i = 0; i < 8; i++)
			ok &= sig[i] == want[i];
		puts(ok ? P "rsdp signature=ok\n" : P "rsdp signature=bad\n");
	}
}

void guest_main(void)
{
	const struct start_info *si = phys(entry_ebx);

	uart_init();
	report_entry_state();

	if (si->magic != HVM_START_MAGIC) {
		puts(P "bad magic ");
		put_hex(si->magic);
		putc('\n');
		guest_reset();
	}
	puts(P "magic ok version=");
	put_dec(si->version);
	putc('\n');
	if (si->version < 1) {
		/* Version 0 has no memmap fields; this guest requires >= 1. */
		puts(P "unsupported version\n");
		guest_reset();
	}

	report_cmdline(si);
	report_memmap(si);
	report_modules(si);
	report_rsdp(si);
	puts(P "done\n");
	guest_reset();
}
