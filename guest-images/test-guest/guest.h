/*
 * fabvm test guest: what the ring-3 C files share (main.c: workload,
 * console, command line; virtio.c: polling virtio-mmio drivers).
 */
#ifndef FABVM_TEST_GUEST_H
#define FABVM_TEST_GUEST_H

#include <stddef.h>
#include <stdint.h>

#include "config.h"

typedef uint8_t u8;
typedef uint16_t u16;
typedef uint32_t u32;
typedef uint64_t u64;

#define barrier() __asm__ volatile("" ::: "memory")

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

static inline u64 rdtsc(void)
{
	u32 lo, hi;
	__asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return ((u64)hi << 32) | lo;
}

static inline void cpu_relax(void)
{
	__asm__ volatile("pause" ::: "memory");
}

static inline u64 min_u64(u64 a, u64 b) { return a < b ? a : b; }

void *memset(void *d, int c, size_t n);
void *memcpy(void *d, const void *s, size_t n);

/* TSC ticks per millisecond (calibrated before any driver runs). */
extern u64 tsc_khz;

/* One console line "fabvm-guest: " + fmt + "\n"; %u (u64), %x (u64, 0x-hex), %s. */
void say(const char *fmt, ...);
/* Print a final line and power off with `status` (0 = success). */
void say_and_stop(u8 status, const char *fmt, ...) __attribute__((noreturn));

/* virtio.c: each runs to completion, or stops the guest with a FAILED line. */
struct virtio_args {
	u64 blk;        /* round trips (0 = none) */
	u64 blkwait;    /* ms between round trips */
	u64 blkbench;   /* ms per benchmark phase (0 = none) */
	u64 rng;        /* 1 = two virtio-rng requests */
	u64 net;        /* 1 = ARP exchange with the host */
	u64 netbench;   /* ms of UDP transmission (0 = none) */
	u64 net_ip;     /* the guest's IPv4 address (host order) */
	u64 net_peer;   /* the host's IPv4 address (host order) */
};
void virtio_run(const struct virtio_args *args);

#endif
