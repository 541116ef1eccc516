/*
 * fabvm test guest: ring-3 workload.
 *
 * Entered from boot.S by iretq at CPL3 with IOPL=3 and interrupts off, on
 * every CPU, with the CPU index as the only argument. Everything here runs
 * at native speed on kvm_pvm (CPL3 is not emulated). No SSE: built with
 * -mgeneral-regs-only because ring 0 leaves CR4.OSFXSR clear.
 *
 * The page-content function (page_key / page_word) is part of the guest's
 * contract: guest-images/README.md documents it so tests can recompute
 * every page. Change both together or not at all.
 */
#include <stdarg.h>

#include "guest.h"

#define PAGE_SHIFT 12
#define PAGE_SIZE 4096ULL
#define MIB (1ULL << 20)
#define CMDLINE_MAX 4096
#define MEMMAP_MAX 128
#define RANGES_MAX 128
#define CHUNK_PAGES 64 /* pages between timer checks (256 KiB) */
#define DIRTY_BURST 256 /* most pages rewritten per check */

#define HVM_START_MAGIC 0x336ec578u

/* ---- page content (documented in README.md) ---- */
#define GOLDEN 0x9E3779B97F4A7C15ULL
#define MIX_C1 0xBF58476D1CE4E5B9ULL
#define MIX_C2 0x94D049BB133111EBULL
#define GEN_MUL 0xD1B54A32D192ED03ULL

/* From boot.S / the linker script. */
extern volatile u32 start_info_pa;
extern volatile u32 mapped_2m;
extern volatile u32 ap_next_cpu;
extern char tramp_start[], tramp_end[];
extern char _end[];

void ring3_entry(u32 cpu) __attribute__((noreturn, used));

/* ------------------------------------------------------------------ */
/* freestanding helpers                                               */
/* ------------------------------------------------------------------ */
void *memset(void *d, int c, size_t n)
{
	u8 *p = d;
	while (n--)
		*p++ = (u8)c;
	return d;
}

void *memcpy(void *d, const void *s, size_t n)
{
	u8 *p = d;
	const u8 *q = s;
	while (n--)
		*p++ = *q++;
	return d;
}

static inline void cpuid(u32 leaf, u32 *a, u32 *b, u32 *c, u32 *d)
{
	__asm__ volatile("cpuid"
			 : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d)
			 : "a"(leaf), "c"(0));
}

/* ------------------------------------------------------------------ */
/* page content                                                       */
/* ------------------------------------------------------------------ */
static u64 seed = 1, sseed = 0xfab;
static u32 share;

static inline u64 mix64(u64 x)
{
	x += GOLDEN;
	x = (x ^ (x >> 30)) * MIX_C1;
	x = (x ^ (x >> 27)) * MIX_C2;
	return x ^ (x >> 31);
}

static inline u64 page_key(u64 gfn, u16 gen)
{
	u64 m = mix64(gfn);
	u64 s = (m % 100 < share) ? sseed : seed;
	return mix64(s ^ m ^ ((u64)gen * GEN_MUL));
}

static void write_page(u64 gfn, u16 gen)
{
	u64 *p = (u64 *)(gfn << PAGE_SHIFT);
	u64 k = page_key(gfn, gen);
	for (u64 i = 0; i < 512; i++)
		p[i] = mix64(k + i * GOLDEN);
}

static int check_page(u64 gfn, u16 gen)
{
	const u64 *p = (const u64 *)(gfn << PAGE_SHIFT);
	u64 k = page_key(gfn, gen);
	u64 bad = 0;
	for (u64 i = 0; i < 512; i++)
		bad |= p[i] ^ mix64(k + i * GOLDEN);
	return bad == 0;
}

/* ------------------------------------------------------------------ */
/* serial console (COM1, polled) and power-off                         */
/* ------------------------------------------------------------------ */
#define COM1 0x3F8

static volatile u32 con_lock;

static void con_acquire(void)
{
	while (__atomic_exchange_n(&con_lock, 1, __ATOMIC_ACQUIRE))
		while (con_lock)
			cpu_relax();
}

static void con_release(void)
{
	__atomic_store_n(&con_lock, 0, __ATOMIC_RELEASE);
}

static void con_putc(char c)
{
	u32 spins = 0;
	/* Wait for THR empty (LSR bit 5); give up waiting after a while so a
	   VMM without LSR emulation cannot hang us. */
	while (!(inb(COM1 + 5) & 0x20) && ++spins < 100000)
		cpu_relax();
	outb(COM1, (u8)c);
}

static void con_puts(const char *s)
{
	while (*s) {
		char c = *s++;
		con_putc((c >= 0x20 && c < 0x7f) ? c : '?');
	}
}

static void con_putu(u64 v)
{
	char b[24];
	int n = 0;
	do {
		b[n++] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	while (n)
		con_putc(b[--n]);
}

static void con_putx(u64 v)
{
	static const char hex[] = "0123456789abcdef";
	int started = 0;
	con_puts("0x");
	for (int sh = 60; sh >= 0; sh -= 4) {
		u32 d = (v >> sh) & 15;
		if (d || started || sh == 0) {
			con_putc(hex[d]);
			started = 1;
		}
	}
}

/*
 * One console line: "fabvm-guest: " + fmt + "\n". Conversions: %u (u64,
 * decimal), %x (u64, 0x-hex), %s (string). All integers are passed as u64.
 */
static void vsay(int keep_lock, const char *fmt, va_list ap)
{
	con_acquire();
	con_puts("fabvm-guest: ");
	for (const char *p = fmt; *p; p++) {
		if (*p != '%') {
			con_putc(*p);
			continue;
		}
		switch (*++p) {
		case 'u':
			con_putu(va_arg(ap, u64));
			break;
		case 'x':
			con_putx(va_arg(ap, u64));
			break;
		case 's':
			con_puts(va_arg(ap, const char *));
			break;
		default:
			con_putc('%');
			if (!*p)
				p--;
			else
				con_putc(*p);
		}
	}
	con_putc('\n');
	if (!keep_lock)
		con_release();
}

void say(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vsay(0, fmt, ap);
	va_end(ap);
}

/*
 * Success: i8042 reset (port 0x64 <- 0xFE; fabvm exits 0 on it), then the
 * status to port 0xf4 (QEMU's isa-debug-exit: exit code (status << 1) | 1).
 * Failure: port 0xf4 first, so that a VMM with both devices (QEMU -M pc or
 * q35 with -no-reboot) reports the failure in its exit code instead of a
 * clean reset. Last resort: spin in ring 3.
 */
static void __attribute__((noreturn)) poweroff(u8 status)
{
	if (status)
		outb(0xf4, status);
	outb(0x64, 0xFE);
	outb(0xf4, status);
	for (;;)
		cpu_relax();
}

/* Print a final line and power off, keeping the console lock so that no
   other CPU prints after it. */
void say_and_stop(u8 status, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vsay(1, fmt, ap);
	va_end(ap);
	poweroff(status);
}

#define die(...) say_and_stop(1, "error " __VA_ARGS__)

/* ------------------------------------------------------------------ */
/* boot information                                                   */
/* ------------------------------------------------------------------ */
struct hvm_start_info {
	u32 magic;
	u32 version;
	u32 flags;
	u32 nr_modules;
	u64 modlist_paddr;
	u64 cmdline_paddr;
	u64 rsdp_paddr;
	u64 memmap_paddr;
	u32 memmap_entries;
	u32 reserved;
};

struct memmap_entry {
	u64 addr;
	u64 size;
	u32 type;
	u32 reserved;
};

static char cmdline[CMDLINE_MAX];
static struct memmap_entry memmap[MEMMAP_MAX];
static u32 memmap_n;

/* ------------------------------------------------------------------ */
/* configuration (command line)                                       */
/* ------------------------------------------------------------------ */
static u64 fill_mib;   /* 0 = all */
static u64 passes;     /* 0 = forever */
static u64 dirty_rate; /* pages/s across the guest */
static u64 hb_ms = 100;
static u64 ncpus = 1;
static struct virtio_args vargs = {
	.net_ip = 0x0a000002,   /* 10.0.0.2 */
	.net_peer = 0x0a000001, /* 10.0.0.1 */
};

static const char *arg_error;
static char arg_error_buf[96];

static int parse_u64(const char *s, u64 *out)
{
	u64 v = 0, base = 10;
	if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
		base = 16;
		s += 2;
	}
	if (!*s)
		return 0;
	for (; *s; s++) {
		u64 d;
		if (*s >= '0' && *s <= '9')
			d = (u64)(*s - '0');
		else if (base == 16 && *s >= 'a' && *s <= 'f')
			d = (u64)(*s - 'a' + 10);
		else if (base == 16 && *s >= 'A' && *s <= 'F')
			d = (u64)(*s - 'A' + 10);
		else
			return 0;
		if (v > (~0ULL - d) / base)
			return 0; /* overflow */
		v = v * base + d;
	}
	*out = v;
	return 1;
}

static void set_arg_error(const char *what, const char *tok)
{
	size_t n = 0;
	for (const char *p = what; *p && n < sizeof(arg_error_buf) - 1; p++)
		arg_error_buf[n++] = *p;
	for (const char *p = tok; *p && n < sizeof(arg_error_buf) - 1; p++)
		arg_error_buf[n++] = *p;
	arg_error_buf[n] = 0;
	arg_error = arg_error_buf;
}

static int streq(const char *a, const char *b)
{
	while (*a && *a == *b)
		a++, b++;
	return *a == *b;
}

static int has_dot(const char *s)
{
	while (*s && *s != '.')
		s++;
	return *s == '.';
}

/* Dotted-quad IPv4 address, into host order. */
static int parse_ipv4(const char *s, u64 *out)
{
	u64 ip = 0;
	for (int part = 0; part < 4; part++) {
		u64 v = 0;
		int digits = 0;
		while (*s >= '0' && *s <= '9' && digits < 4) {
			v = v * 10 + (u64)(*s++ - '0');
			digits++;
		}
		if (!digits || v > 255 || *s != (part < 3 ? '.' : 0))
			return 0;
		if (part < 3)
			s++;
		ip = ip << 8 | v;
	}
	*out = ip;
	return 1;
}

/* Parse "key=value key=value ..." in place (cmdline is kept intact for
   the boot line by parsing a copy). The first problem is kept in
   arg_error. */
static void parse_cmdline(void)
{
	static char buf[CMDLINE_MAX];
	memcpy(buf, cmdline, sizeof(buf));
	char *p = buf;
	while (*p && !arg_error) {
		while (*p == ' ' || *p == '\t' || *p == '\n')
			p++;
		if (!*p)
			break;
		char *tok = p;
		while (*p && *p != ' ' && *p != '\t' && *p != '\n')
			p++;
		if (*p)
			*p++ = 0;
		char *eq = tok;
		while (*eq && *eq != '=')
			eq++;
		if (!*eq) {
			set_arg_error("bad argument (want key=value): ", tok);
			break;
		}
		*eq = 0;
		const char *key = tok, *val = eq + 1;
		u64 v;
		/* module.param=... belongs to someone else (fabvm adds
		   virtio_mmio.device= for Linux kernels): skip it. */
		if (has_dot(key))
			continue;
		if (streq(key, "netip") || streq(key, "netpeer")) {
			if (!parse_ipv4(val, streq(key, "netip") ? &vargs.net_ip : &vargs.net_peer)) {
				*eq = '=';
				set_arg_error("bad IPv4 address: ", tok);
			}
			continue;
		}
		if (!parse_u64(val, &v)) {
			*eq = '=';
			set_arg_error("bad number: ", tok);
			break;
		}
		if (streq(key, "seed"))
			seed = v;
		else if (streq(key, "sseed"))
			sseed = v;
		else if (streq(key, "share")) {
			if (v > 100)
				arg_error = "share must be 0..100";
			share = (u32)v;
		} else if (streq(key, "fill")) {
			if (v == 0)
				arg_error = "fill must be >= 1 (MiB)";
			fill_mib = v;
		} else if (streq(key, "passes"))
			passes = v;
		else if (streq(key, "dirty")) {
			if (v > 1000000000ULL)
				arg_error = "dirty must be <= 1000000000 (pages/s)";
			dirty_rate = v;
		} else if (streq(key, "hb")) {
			if (v > 3600000ULL)
				arg_error = "hb must be <= 3600000 (ms)";
			hb_ms = v;
		} else if (streq(key, "cpus")) {
			if (v < 1 || v > MAX_CPUS)
				arg_error = "cpus must be 1..64";
			ncpus = v;
		} else if (streq(key, "blk"))
			vargs.blk = v;
		else if (streq(key, "blkwait")) {
			if (v > 3600000ULL)
				arg_error = "blkwait must be <= 3600000 (ms)";
			vargs.blkwait = v;
		} else if (streq(key, "blkbench")) {
			if (v > 3600000ULL)
				arg_error = "blkbench must be <= 3600000 (ms)";
			vargs.blkbench = v;
		} else if (streq(key, "rng")) {
			if (v > 1)
				arg_error = "rng must be 0 or 1";
			vargs.rng = v;
		} else if (streq(key, "net")) {
			if (v > 1)
				arg_error = "net must be 0 or 1";
			vargs.net = v;
		} else if (streq(key, "netbench")) {
			if (v > 3600000ULL)
				arg_error = "netbench must be <= 3600000 (ms)";
			vargs.netbench = v;
		} else {
			*eq = '=';
			set_arg_error("unknown argument: ", tok);
		}
	}
}

/* ------------------------------------------------------------------ */
/* memory layout                                                      */
/* ------------------------------------------------------------------ */
struct range {
	u64 gfn;   /* first frame */
	u64 n;     /* frames */
	u64 first; /* global page index of the first frame */
};

static struct range ranges[RANGES_MAX];
static u32 nranges;
static u64 total_pages;
static u16 *gen_tab;      /* generation per frame, indexed by gfn - gen_base */
static u64 gen_base, gen_count;
static u64 fill_start, fill_end; /* physical; pages filled are RAM in [start, end) */

static u64 idx_to_gfn(u64 idx)
{
	u32 i = 0;
	while (i + 1 < nranges && idx >= ranges[i].first + ranges[i].n)
		i++;
	return ranges[i].gfn + (idx - ranges[i].first);
}

static u64 align_up(u64 v, u64 a) { return (v + a - 1) & ~(a - 1); }

static void layout_memory(void)
{
	u64 top = 0;
	u64 mapped_top = (u64)mapped_2m << 21;
	/* sort by address (the map is tiny) */
	for (u32 i = 1; i < memmap_n; i++)
		for (u32 j = i; j > 0 && memmap[j].addr < memmap[j - 1].addr; j--) {
			struct memmap_entry t = memmap[j];
			memmap[j] = memmap[j - 1];
			memmap[j - 1] = t;
		}
	for (u32 i = 0; i < memmap_n; i++) {
		if (memmap[i].type != 1)
			continue;
		if (memmap[i].addr + memmap[i].size > top)
			top = memmap[i].addr + memmap[i].size;
	}
	top = min_u64(top, mapped_top);

	/* The image, its bss, and the generation table must be in RAM. */
	u64 image_end = align_up((u64)(uintptr_t)_end, PAGE_SIZE);
	u64 gen_bytes = align_up(((top >> PAGE_SHIFT) + 1) * sizeof(u16), PAGE_SIZE);
	fill_start = align_up(image_end + gen_bytes, 2 * MIB);
	int ok = 0;
	for (u32 i = 0; i < memmap_n; i++)
		if (memmap[i].type == 1 && memmap[i].addr <= 0x100000 &&
		    memmap[i].addr + memmap[i].size >= image_end + gen_bytes)
			ok = 1;
	if (!ok)
		die("guest image area 0x100000..%x is not RAM", image_end + gen_bytes);
	gen_tab = (u16 *)(uintptr_t)image_end;
	gen_base = fill_start >> PAGE_SHIFT;

	u64 want = fill_mib ? fill_mib * (MIB / PAGE_SIZE) : ~0ULL;
	fill_end = fill_start;
	for (u32 i = 0; i < memmap_n && want; i++) {
		if (memmap[i].type != 1)
			continue;
		u64 a = align_up(memmap[i].addr, PAGE_SIZE);
		u64 b = (memmap[i].addr + memmap[i].size) & ~(PAGE_SIZE - 1);
		if (a < fill_start)
			a = fill_start;
		if (b > top)
			b = top;
		if (a >= b)
			continue;
		u64 n = min_u64((b - a) >> PAGE_SHIFT, want);
		if (nranges == RANGES_MAX)
			break;
		ranges[nranges].gfn = a >> PAGE_SHIFT;
		ranges[nranges].n = n;
		ranges[nranges].first = total_pages;
		nranges++;
		total_pages += n;
		want -= fill_mib ? n : 0;
		fill_end = a + (n << PAGE_SHIFT);
	}
	if (fill_mib && want)
		die("fill=%u MiB is more than the %u MiB available above %x", fill_mib,
		    (total_pages << PAGE_SHIFT) / MIB, fill_start);
	if (total_pages < ncpus)
		die("no memory to fill above %x", fill_start);
	gen_count = (fill_end >> PAGE_SHIFT) - gen_base;
}

/* ------------------------------------------------------------------ */
/* time                                                               */
/* ------------------------------------------------------------------ */
u64 tsc_khz;
static const char *tsc_src = "guess";

static u32 pit_read0(void)
{
	outb(0x43, 0x00); /* latch channel 0 */
	u32 lo = inb(0x40);
	u32 hi = inb(0x40);
	return lo | (hi << 8);
}

static void calibrate_tsc(void)
{
	u32 a, b, c, d;
	cpuid(0x40000000, &a, &b, &c, &d);
	if (a >= 0x40000010 && a < 0x40010000) {
		cpuid(0x40000010, &a, &b, &c, &d);
		if (a) {
			tsc_khz = a;
			tsc_src = "cpuid";
			return;
		}
	}
	/*
	 * PIT channel 0 (its gate is always on; channel 2's gate and OUT pin
	 * need the port-0x61 speaker logic, which QEMU's microvm lacks):
	 * mode 0 from 0xffff, read the counter with latch commands and time
	 * 11932 PIT ticks (10 ms) with the TSC. Mode 0 raises IRQ0 once when
	 * it reaches zero; interrupts stay off, so that is harmless.
	 */
	outb(0x43, 0x30); /* ch0, lo/hi, mode 0, binary */
	outb(0x40, 0xff);
	outb(0x40, 0xff);
	u32 prev = pit_read0(), same = 0;
	u64 t0 = rdtsc(), t1 = t0, elapsed = 0;
	while (elapsed < 11932 && same < 1000) {
		u32 c = pit_read0();
		t1 = rdtsc();
		if (c == prev) {
			same++;
			continue;
		}
		same = 0;
		elapsed += (prev - c) & 0xffff;
		prev = c;
	}
	if (elapsed >= 11932 && t1 > t0) {
		/* ticks per ms = TSC ticks / (elapsed / 1193.182) */
		tsc_khz = (t1 - t0) * 1193182ULL / (elapsed * 1000ULL);
		if (tsc_khz) {
			tsc_src = "pit";
			return;
		}
	}
	tsc_khz = 1000000; /* 1 GHz: only timing is affected */
	tsc_src = "guess";
}

static u64 ticks_to_ms(u64 t) { return t / tsc_khz; }

/* ------------------------------------------------------------------ */
/* per-CPU state and the BSP's bookkeeping                            */
/* ------------------------------------------------------------------ */
struct percpu {
	volatile u32 started;
	volatile u32 filled;
	volatile u64 fill_end_tsc;
	volatile u64 passes_done;
	u64 lo, hi; /* page indices [lo, hi) owned by this CPU */
	u64 rng;
	u64 dirty_rate, dirty_acc, dirty_last, dirty_owed;
	u64 dirtied;
} __attribute__((aligned(128)));

static struct percpu pc[MAX_CPUS];
static volatile u32 go_fill, go_run;

static u64 hb_ticks, hb_next, hb_count;
static u64 fill_t0; /* TSC when the fill started */
static u64 passes_reported;

static void bsp_tick(int running)
{
	u64 now = rdtsc();
	if (hb_ticks && now >= hb_next) {
		say("heartbeat %u", ++hb_count);
		hb_next += hb_ticks;
		if (now >= hb_next) /* fell behind (paused VM): resync */
			hb_next = now + hb_ticks;
	}
	if (!running)
		return;
	u64 minp = ~0ULL;
	for (u64 i = 0; i < ncpus; i++)
		minp = min_u64(minp, pc[i].passes_done);
	while (passes_reported < minp) {
		say("verify ok pass=%u", ++passes_reported);
		if (passes && passes_reported >= passes)
			say_and_stop(0, "done");
	}
}

static u64 xorshift(u64 *s)
{
	u64 x = *s;
	x ^= x << 13;
	x ^= x >> 7;
	x ^= x << 17;
	return *s = x;
}

static void dirty_tick(struct percpu *me)
{
	if (!me->dirty_rate || me->hi == me->lo)
		return;
	u64 now = rdtsc();
	u64 hz = tsc_khz * 1000;
	u64 d = now - me->dirty_last;
	me->dirty_last = now;
	if (d > hz) /* paused or stalled: do not try to catch up > 1 s */
		d = hz;
	me->dirty_acc += d * me->dirty_rate;
	u64 n = me->dirty_acc / hz;
	me->dirty_acc -= n * hz;
	me->dirty_owed += n;
	if (me->dirty_owed > me->dirty_rate)
		me->dirty_owed = me->dirty_rate;
	u64 todo = min_u64(me->dirty_owed, DIRTY_BURST);
	me->dirty_owed -= todo;
	u64 span = me->hi - me->lo;
	while (todo--) {
		u64 idx = me->lo + xorshift(&me->rng) % span;
		u64 gfn = idx_to_gfn(idx);
		u16 g = (u16)(gen_tab[gfn - gen_base] + 1);
		gen_tab[gfn - gen_base] = g;
		write_page(gfn, g);
		me->dirtied++;
	}
}

static void __attribute__((noreturn)) worker(u32 cpu)
{
	struct percpu *me = &pc[cpu];

	/* fill */
	for (u64 idx = me->lo; idx < me->hi;) {
		u64 end = min_u64(idx + CHUNK_PAGES, me->hi);
		for (; idx < end; idx++)
			write_page(idx_to_gfn(idx), 0);
		if (cpu == 0)
			bsp_tick(0);
	}
	me->fill_end_tsc = rdtsc();
	barrier();
	me->filled = 1;

	if (cpu != 0) {
		while (!go_run)
			cpu_relax();
	} else {
		for (;;) {
			u32 all = 1;
			for (u64 i = 0; i < ncpus; i++)
				all &= pc[i].filled;
			if (all)
				break;
			bsp_tick(0);
			cpu_relax();
		}
		u64 last = 0;
		for (u64 i = 0; i < ncpus; i++)
			if (pc[i].fill_end_tsc > last)
				last = pc[i].fill_end_tsc;
		say("ready pages=%u fill_mib=%u cpus=%u seed=%u share=%u ms=%u", total_pages,
		    (total_pages << PAGE_SHIFT) / MIB, ncpus, seed, (u64)share,
		    ticks_to_ms(last - fill_t0));
		barrier();
		go_run = 1;
	}

	/* verify forever (or `passes` times), rewriting pages at the dirty rate */
	me->dirty_last = rdtsc();
	u64 pass = 0;
	for (;;) {
		for (u64 idx = me->lo; idx < me->hi;) {
			u64 end = min_u64(idx + CHUNK_PAGES, me->hi);
			for (; idx < end; idx++) {
				u64 gfn = idx_to_gfn(idx);
				if (!check_page(gfn, gen_tab[gfn - gen_base]))
					say_and_stop(1, "verify FAILED at page %u", gfn);
			}
			dirty_tick(me);
			if (cpu == 0)
				bsp_tick(1);
		}
		me->passes_done = ++pass;
		if (cpu == 0)
			bsp_tick(1);
		if (passes && pass >= passes)
			break;
	}
	for (;;) {
		if (cpu == 0)
			bsp_tick(1);
		cpu_relax();
	}
}


/* ------------------------------------------------------------------ */
/* application processors                                             */
/* ------------------------------------------------------------------ */
static inline void apic_write(u32 reg, u32 v)
{
	*(volatile u32 *)(uintptr_t)(APIC_BASE + reg) = v;
}

static inline u32 apic_read(u32 reg)
{
	return *(volatile u32 *)(uintptr_t)(APIC_BASE + reg);
}

static void apic_ipi(u32 apic_id, u32 icr_lo)
{
	u64 spins = 0;
	while ((apic_read(0x300) & (1u << 12)) && ++spins < 1000000)
		cpu_relax();
	apic_write(0x310, apic_id << 24);
	apic_write(0x300, icr_lo);
}

static void delay_us(u64 us)
{
	u64 end = rdtsc() + us * tsc_khz / 1000;
	while (rdtsc() < end)
		cpu_relax();
}

static void start_aps(void)
{
	memcpy((void *)(uintptr_t)TRAMPOLINE_ADDR, tramp_start, (size_t)(tramp_end - tramp_start));
	apic_write(0xF0, apic_read(0xF0) | 0x100 | 0xFF); /* software-enable */
	for (u32 cpu = 1; cpu < ncpus; cpu++) {
		ap_next_cpu = cpu;
		barrier();
		apic_ipi(cpu, 0x00004500);               /* INIT, assert */
		delay_us(100);
		apic_ipi(cpu, 0x00004600 | SIPI_VECTOR); /* STARTUP */
		delay_us(200);
		apic_ipi(cpu, 0x00004600 | SIPI_VECTOR); /* STARTUP again */
		u64 deadline = rdtsc() + 5000 * tsc_khz; /* 5 s */
		while (!pc[cpu].started) {
			if (rdtsc() > deadline)
				die("cpu %u (APIC ID %u) did not start", (u64)cpu, (u64)cpu);
			cpu_relax();
		}
	}
}

/* ------------------------------------------------------------------ */
/* entry                                                              */
/* ------------------------------------------------------------------ */
static void __attribute__((noreturn)) bsp_main(void)
{
	/* Copy what the loader gave us before touching any memory. */
	const struct hvm_start_info *si =
		(const struct hvm_start_info *)(uintptr_t)start_info_pa;
	const char *boot_err = 0;
	if (!start_info_pa || si->magic != HVM_START_MAGIC)
		boot_err = "no PVH start info (bad magic)";
	else if (si->version < 1 || !si->memmap_paddr || !si->memmap_entries)
		boot_err = "PVH start info has no memory map (version < 1)";
	else {
		if (si->cmdline_paddr) {
			const char *c = (const char *)(uintptr_t)si->cmdline_paddr;
			u32 n = 0;
			while (n < CMDLINE_MAX - 1 && c[n])
				n++;
			memcpy(cmdline, c, n);
			cmdline[n] = 0;
		}
		memmap_n = min_u64(si->memmap_entries, MEMMAP_MAX);
		memcpy(memmap, (const void *)(uintptr_t)si->memmap_paddr,
		       memmap_n * sizeof(memmap[0]));
	}
	if (boot_err)
		die("%s", boot_err);

	parse_cmdline();
	u64 ram = 0;
	for (u32 i = 0; i < memmap_n; i++)
		if (memmap[i].type == 1)
			ram += memmap[i].size;
	say("boot cpus=%u mem_mib=%u cmdline=%s", ncpus, ram / MIB, cmdline);
	if (arg_error)
		die("%s", arg_error);

	layout_memory();
	calibrate_tsc();
	say("info tsc_khz=%u tsc=%s fill_start=%x fill_end=%x gen_table=%x", tsc_khz, tsc_src,
	    fill_start, fill_end, (u64)(uintptr_t)gen_tab);
	/* virtio work first (blk, blkbench, rng, net, netbench), then the workload. */
	virtio_run(&vargs);
	memset(gen_tab, 0, gen_count * sizeof(u16));

	/* Split pages evenly; give each CPU its share of the dirty rate. */
	for (u64 i = 0; i < ncpus; i++) {
		pc[i].lo = total_pages * i / ncpus;
		pc[i].hi = total_pages * (i + 1) / ncpus;
		pc[i].rng = mix64(seed ^ (0xD1CEull << 32) ^ i) | 1;
		pc[i].dirty_rate = dirty_rate / ncpus + (i < dirty_rate % ncpus);
	}
	pc[0].started = 1;
	if (ncpus > 1)
		start_aps();

	hb_ticks = hb_ms * tsc_khz;
	fill_t0 = rdtsc();
	hb_next = fill_t0 + hb_ticks;
	barrier();
	go_fill = 1;
	worker(0);
}

void ring3_entry(u32 cpu)
{
	if (cpu == 0)
		bsp_main();
	pc[cpu].started = 1;
	while (!go_fill)
		cpu_relax();
	worker(cpu);
}
