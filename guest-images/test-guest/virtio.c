/*
 * fabvm test guest: polling virtio-mmio drivers (version 2, "modern" only)
 * for virtio-blk, virtio-net and virtio-rng, run from ring 3 with
 * interrupts off.
 *
 * One request in flight per queue except in the net benchmark; each driver
 * finds its device by scanning fabvm's and QEMU microvm's register windows
 * (config.h), negotiates VERSION_1, puts its rings and buffers in the
 * image's own .bss (identity-mapped, so virtual = guest physical), and polls
 * the used ring. The device's interrupt is never acknowledged: nothing here
 * waits for it. Every failure ends the guest with a `blk FAILED`,
 * `net FAILED` or `rng FAILED` line (see guest-images/README.md for every line).
 */
#include "guest.h"

/* ---- virtio-mmio registers (virtio 1.x, 4.2.2) ---- */
#define R_MAGIC 0x000
#define R_VERSION 0x004
#define R_DEVICE_ID 0x008
#define R_DEVICE_FEATURES 0x010
#define R_DEVICE_FEATURES_SEL 0x014
#define R_DRIVER_FEATURES 0x020
#define R_DRIVER_FEATURES_SEL 0x024
#define R_QUEUE_SEL 0x030
#define R_QUEUE_NUM_MAX 0x034
#define R_QUEUE_NUM 0x038
#define R_QUEUE_READY 0x044
#define R_QUEUE_NOTIFY 0x050
#define R_STATUS 0x070
#define R_QUEUE_DESC_LOW 0x080
#define R_QUEUE_DESC_HIGH 0x084
#define R_QUEUE_AVAIL_LOW 0x090
#define R_QUEUE_AVAIL_HIGH 0x094
#define R_QUEUE_USED_LOW 0x0a0
#define R_QUEUE_USED_HIGH 0x0a4
#define R_CONFIG 0x100

#define VIRTIO_MAGIC 0x74726976 /* "virt" */
#define ID_NET 1
#define ID_BLK 2
#define ID_RNG 4

#define S_ACK 1
#define S_DRIVER 2
#define S_DRIVER_OK 4
#define S_FEATURES_OK 8
#define S_NEEDS_RESET 64

#define F_VERSION_1 (1ULL << 32)
#define F_BLK_RO (1ULL << 5)
#define F_BLK_FLUSH (1ULL << 9)
#define F_NET_MAC (1ULL << 5)

#define D_NEXT 1
#define D_WRITE 2

#define QSIZE 16
#define TIMEOUT_MS 10000

struct vring_desc {
	u64 addr;
	u32 len;
	u16 flags;
	u16 next;
};

struct vring_avail {
	u16 flags;
	u16 idx;
	u16 ring[QSIZE];
	u16 used_event;
};

struct vring_used {
	u16 flags;
	u16 idx;
	struct {
		u32 id;
		u32 len;
	} ring[QSIZE];
	u16 avail_event;
};

/* Rings of one queue: descriptor table, available ring, used ring, a page each. */
struct ring_pages {
	struct vring_desc desc[QSIZE] __attribute__((aligned(4096)));
	struct vring_avail avail __attribute__((aligned(4096)));
	struct vring_used used __attribute__((aligned(4096)));
} __attribute__((aligned(4096)));

struct vq {
	u32 index;
	struct ring_pages *r;
	u16 next_avail; /* avail->idx we publish next */
	u16 used_seen;  /* used entries consumed */
};

struct vdev {
	u64 base;
	u64 features; /* negotiated */
};

static inline u32 rd(const struct vdev *d, u32 off)
{
	return *(volatile u32 *)(uintptr_t)(d->base + off);
}

static inline void wr(const struct vdev *d, u32 off, u32 v)
{
	*(volatile u32 *)(uintptr_t)(d->base + off) = v;
}

static inline u8 rd8(const struct vdev *d, u32 off)
{
	return *(volatile u8 *)(uintptr_t)(d->base + off);
}

static inline u64 addr_of(const volatile void *p) { return (u64)(uintptr_t)p; }

static u64 ms_to_ticks(u64 ms) { return ms * tsc_khz; }

/* ------------------------------------------------------------------ */
/* transport                                                          */
/* ------------------------------------------------------------------ */

/* Finds the first version-2 device with id `want`; 0 if there is none. */
static u64 find_device(u32 want, u32 *legacy_seen)
{
	static const struct {
		u64 base, stride, n;
	} windows[] = {
		{VIRTIO_FABVM_BASE, VIRTIO_FABVM_STRIDE, VIRTIO_FABVM_SLOTS},
		{VIRTIO_QEMU_BASE, VIRTIO_QEMU_STRIDE, VIRTIO_QEMU_SLOTS},
	};
	*legacy_seen = 0;
	for (u32 w = 0; w < sizeof(windows) / sizeof(windows[0]); w++)
		for (u64 i = 0; i < windows[w].n; i++) {
			struct vdev d = {windows[w].base + i * windows[w].stride, 0};
			if (rd(&d, R_MAGIC) != VIRTIO_MAGIC || rd(&d, R_DEVICE_ID) != want)
				continue;
			if (rd(&d, R_VERSION) == 2)
				return d.base;
			*legacy_seen = 1;
		}
	return 0;
}

/* Reset, ACKNOWLEDGE, DRIVER, features (VERSION_1 plus what `want` and the
   device have in common), FEATURES_OK. Returns an error message or 0. */
static const char *dev_negotiate(struct vdev *d, u64 want)
{
	wr(d, R_STATUS, 0);
	if (rd(d, R_STATUS) != 0)
		return "device does not reset";
	wr(d, R_STATUS, S_ACK);
	wr(d, R_STATUS, S_ACK | S_DRIVER);
	wr(d, R_DEVICE_FEATURES_SEL, 0);
	u64 offered = rd(d, R_DEVICE_FEATURES);
	wr(d, R_DEVICE_FEATURES_SEL, 1);
	offered |= (u64)rd(d, R_DEVICE_FEATURES) << 32;
	if (!(offered & F_VERSION_1))
		return "device does not offer VERSION_1";
	d->features = (offered & want) | F_VERSION_1;
	wr(d, R_DRIVER_FEATURES_SEL, 0);
	wr(d, R_DRIVER_FEATURES, (u32)d->features);
	wr(d, R_DRIVER_FEATURES_SEL, 1);
	wr(d, R_DRIVER_FEATURES, (u32)(d->features >> 32));
	wr(d, R_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
	if (!(rd(d, R_STATUS) & S_FEATURES_OK))
		return "device refused FEATURES_OK";
	return 0;
}

/* Sets up queue `index` on `r` (zeroed here). Returns an error message or 0. */
static const char *vq_setup(struct vdev *d, struct vq *q, u32 index, struct ring_pages *r)
{
	memset(r, 0, sizeof(*r));
	q->index = index;
	q->r = r;
	q->next_avail = 0;
	q->used_seen = 0;
	wr(d, R_QUEUE_SEL, index);
	if (rd(d, R_QUEUE_READY))
		return "queue already in use";
	if (rd(d, R_QUEUE_NUM_MAX) < QSIZE)
		return "queue missing or smaller than 16";
	wr(d, R_QUEUE_NUM, QSIZE);
	wr(d, R_QUEUE_DESC_LOW, (u32)addr_of(r->desc));
	wr(d, R_QUEUE_DESC_HIGH, (u32)(addr_of(r->desc) >> 32));
	wr(d, R_QUEUE_AVAIL_LOW, (u32)addr_of(&r->avail));
	wr(d, R_QUEUE_AVAIL_HIGH, (u32)(addr_of(&r->avail) >> 32));
	wr(d, R_QUEUE_USED_LOW, (u32)addr_of(&r->used));
	wr(d, R_QUEUE_USED_HIGH, (u32)(addr_of(&r->used) >> 32));
	wr(d, R_QUEUE_READY, 1);
	if (!rd(d, R_QUEUE_READY))
		return "queue not ready after setup";
	return 0;
}

static const char *dev_go(struct vdev *d)
{
	wr(d, R_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
	u32 s = rd(d, R_STATUS);
	if (s & S_NEEDS_RESET)
		return "device needs reset after DRIVER_OK";
	if (!(s & S_DRIVER_OK))
		return "device refused DRIVER_OK";
	return 0;
}

/* Makes the chain headed by `head` available (no notification). */
static void vq_put(struct vq *q, u16 head)
{
	q->r->avail.ring[q->next_avail % QSIZE] = head;
	barrier();
	q->next_avail++;
	*(volatile u16 *)&q->r->avail.idx = q->next_avail;
	barrier();
}

static void vq_kick(struct vdev *d, struct vq *q) { wr(d, R_QUEUE_NOTIFY, q->index); }

/* Takes the next used entry if there is one: 1 and its id and length. */
static int vq_take(struct vq *q, u32 *id, u32 *len)
{
	u16 idx = *(volatile u16 *)&q->r->used.idx;
	if (idx == q->used_seen)
		return 0;
	barrier();
	u32 slot = q->used_seen % QSIZE;
	*id = *(volatile u32 *)&q->r->used.ring[slot].id;
	*len = *(volatile u32 *)&q->r->used.ring[slot].len;
	q->used_seen++;
	return 1;
}

/* Waits up to TIMEOUT_MS for the next used entry; 0 on timeout. */
static int vq_wait(struct vq *q, u32 *id, u32 *len)
{
	u64 deadline = rdtsc() + ms_to_ticks(TIMEOUT_MS);
	while (!vq_take(q, id, len)) {
		/* Past the deadline look once more: the VM may have been paused. */
		if (rdtsc() > deadline)
			return vq_take(q, id, len);
		cpu_relax();
	}
	return 1;
}

/* ------------------------------------------------------------------ */
/* small helpers                                                      */
/* ------------------------------------------------------------------ */
static void put_be16(u8 *p, u32 v)
{
	p[0] = (u8)(v >> 8);
	p[1] = (u8)v;
}

static u32 get_be16(const u8 *p) { return ((u32)p[0] << 8) | p[1]; }

static void put_be32(u8 *p, u32 v)
{
	put_be16(p, v >> 16);
	put_be16(p + 2, v);
}

static u32 get_be32(const u8 *p) { return (get_be16(p) << 16) | get_be16(p + 2); }

static char *put_dec(char *p, u64 v)
{
	char b[24];
	int n = 0;
	do {
		b[n++] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	while (n)
		*p++ = b[--n];
	return p;
}

static const char *ip_str(u32 ip, char *buf)
{
	char *p = buf;
	for (int i = 3; i >= 0; i--) {
		p = put_dec(p, (ip >> (8 * i)) & 0xff);
		if (i)
			*p++ = '.';
	}
	*p = 0;
	return buf;
}

static const char *mac_str(const u8 *mac, char *buf)
{
	static const char hex[] = "0123456789abcdef";
	for (int i = 0; i < 6; i++) {
		buf[3 * i] = hex[mac[i] >> 4];
		buf[3 * i + 1] = hex[mac[i] & 15];
		buf[3 * i + 2] = i < 5 ? ':' : 0;
	}
	return buf;
}

static u64 xorshift(u64 *s)
{
	u64 x = *s;
	x ^= x << 13;
	x ^= x >> 7;
	x ^= x << 17;
	return *s = x;
}

/* Elapsed TSC ticks as microseconds times 10 (one decimal). */
static u64 ticks_to_us10(u64 t) { return t * 10000 / tsc_khz; }

/* ------------------------------------------------------------------ */
/* virtio-blk                                                         */
/* ------------------------------------------------------------------ */
#define BLK_T_IN 0
#define BLK_T_OUT 1
#define BLK_T_FLUSH 4
#define BLK_T_GET_ID 8
#define BLK_S_OK 0
#define BLK_S_IOERR 1
#define BLK_S_UNSUPP 2
#define BLK_ROUND_BYTES 4096
#define BLK_ROUND_SECTORS (BLK_ROUND_BYTES / 512)
#define BENCH_BIG (1 << 20)
#define BENCH_SMALL 4096

static struct ring_pages blk_rings;
static struct {
	u32 type;
	u32 reserved;
	u64 sector;
} blk_hdr __attribute__((aligned(16)));
static volatile u8 blk_status;
static u8 blk_wbuf[BLK_ROUND_BYTES] __attribute__((aligned(4096)));
static u8 blk_rbuf[BLK_ROUND_BYTES] __attribute__((aligned(4096)));
static u8 blk_big[BENCH_BIG] __attribute__((aligned(4096)));
static char blk_id[21];

static struct vdev blk;
static struct vq blk_q;
static u64 blk_sectors;

#define blk_fail(...) say_and_stop(1, "blk FAILED " __VA_ARGS__)

/* One request: header, optional data buffer, status byte. Returns the
   status the device wrote (0xff if it wrote none). */
static u32 blk_request(u32 type, u64 sector, void *buf, u32 len)
{
	struct vring_desc *desc = blk_q.r->desc;
	blk_hdr.type = type;
	blk_hdr.reserved = 0;
	blk_hdr.sector = sector;
	blk_status = 0xff;
	desc[0] = (struct vring_desc){addr_of(&blk_hdr), sizeof(blk_hdr), D_NEXT, 1};
	u16 last = 1;
	if (len) {
		u16 flags = D_NEXT | (type == BLK_T_OUT ? 0 : D_WRITE);
		desc[1] = (struct vring_desc){addr_of(buf), len, flags, 2};
		last = 2;
	}
	desc[last] = (struct vring_desc){addr_of(&blk_status), 1, D_WRITE, 0};
	vq_put(&blk_q, 0);
	vq_kick(&blk, &blk_q);
	u32 id, used_len;
	if (!vq_wait(&blk_q, &id, &used_len))
		blk_fail("timeout: request type %u at sector %u not completed", (u64)type, sector);
	if (id != 0)
		blk_fail("used ring returned descriptor %u, not 0", (u64)id);
	barrier();
	return blk_status;
}

static void blk_init(void)
{
	u32 legacy;
	blk.base = find_device(ID_BLK, &legacy);
	if (!blk.base)
		blk_fail("%s", legacy ? "only a legacy (version 1) virtio-blk device found"
				      : "no virtio-blk device found");
	const char *err = dev_negotiate(&blk, F_BLK_RO | F_BLK_FLUSH);
	if (!err)
		err = vq_setup(&blk, &blk_q, 0, &blk_rings);
	if (!err)
		err = dev_go(&blk);
	if (err)
		blk_fail("%s", err);
	blk_sectors = rd(&blk, R_CONFIG) | ((u64)rd(&blk, R_CONFIG + 4) << 32);

	memset(blk_id, 0, sizeof(blk_id));
	u32 st = blk_request(BLK_T_GET_ID, 0, blk_id, 20);
	for (int i = 0; i < 20; i++)
		if (blk_id[i] && (blk_id[i] < 0x21 || blk_id[i] > 0x7e))
			blk_id[i] = '?';
	if (st != BLK_S_OK || !blk_id[0]) {
		blk_id[0] = '-';
		blk_id[1] = 0;
	}
	say("blk found base=%x sectors=%u ro=%u id=%s", blk.base, blk_sectors,
	    (u64)!!(blk.features & F_BLK_RO), blk_id);
}

/* The 4 KiB block of round `round` (1, 2, ...) and where it goes. */
static u64 blk_round_sector(u64 round)
{
	u64 blocks = blk_sectors / BLK_ROUND_SECTORS;
	return ((round - 1) % blocks) * BLK_ROUND_SECTORS;
}

/* Sector s of round r: "fabvm-blk round=<r> sector=<s>\n", then byte j of
   the sector (j counted from the sector's start) = (j + s + r) & 0xff. */
static void blk_pattern(u8 *buf, u64 round, u64 sector0)
{
	for (u64 k = 0; k < BLK_ROUND_SECTORS; k++) {
		u8 *p = buf + k * 512;
		u64 s = sector0 + k;
		for (u64 j = 0; j < 512; j++)
			p[j] = (u8)(j + s + round);
		char *t = (char *)p;
		const char *a = "fabvm-blk round=";
		while (*a)
			*t++ = *a++;
		t = put_dec(t, round);
		a = " sector=";
		while (*a)
			*t++ = *a++;
		t = put_dec(t, s);
		*t = '\n';
	}
}

static void blk_expect(u64 round, u64 sector0, const char *what)
{
	memset(blk_rbuf, 0, sizeof(blk_rbuf));
	u32 st = blk_request(BLK_T_IN, sector0, blk_rbuf, sizeof(blk_rbuf));
	if (st != BLK_S_OK)
		blk_fail("read of sector %u: status %u", sector0, (u64)st);
	blk_pattern(blk_wbuf, round, sector0);
	for (u64 i = 0; i < sizeof(blk_rbuf); i++)
		if (blk_rbuf[i] != blk_wbuf[i])
			blk_fail("%s: round %u block at sector %u differs at byte %u", what, round,
				 sector0, i);
}

static void blk_round(u64 round)
{
	u64 s0 = blk_round_sector(round);
	blk_pattern(blk_wbuf, round, s0);
	u32 st = blk_request(BLK_T_OUT, s0, blk_wbuf, sizeof(blk_wbuf));
	if (blk.features & F_BLK_RO) {
		if (st != BLK_S_IOERR)
			blk_fail("write to a read-only disk: status %u, not IOERR", (u64)st);
		memset(blk_rbuf, 0, sizeof(blk_rbuf));
		st = blk_request(BLK_T_IN, s0, blk_rbuf, sizeof(blk_rbuf));
		if (st != BLK_S_OK)
			blk_fail("read of sector %u: status %u", s0, (u64)st);
		say("blk ro write=ioerr read=ok sectors=%u round=%u sector=%u", blk_sectors, round,
		    s0);
		return;
	}
	if (st != BLK_S_OK)
		blk_fail("write of sector %u: status %u", s0, (u64)st);
	if (blk.features & F_BLK_FLUSH) {
		st = blk_request(BLK_T_FLUSH, 0, 0, 0);
		if (st != BLK_S_OK)
			blk_fail("flush: status %u", (u64)st);
	}
	blk_expect(round, s0, "read back");
	/* The previous round's block is still there (across a snapshot too). */
	if (round > 1 && blk_round_sector(round - 1) != s0)
		blk_expect(round - 1, blk_round_sector(round - 1), "earlier write lost");
	say("blk ok sectors=%u round=%u sector=%u", blk_sectors, round, s0);
}

/* One benchmark phase: requests of `bs` bytes for `ms` milliseconds,
   sequential (wrapping) or at random `bs`-aligned offsets. */
static void blk_bench_phase(const char *name, u32 type, u32 bs, int random, u64 ms)
{
	u64 nblocks = blk_sectors * 512 / bs;
	if (!nblocks)
		blk_fail("disk smaller than %u bytes: no %s benchmark", (u64)bs, name);
	u64 rng = 0x9E3779B97F4A7C15ULL ^ bs ^ type;
	u64 ops = 0, max_lat = 0;
	u64 t0 = rdtsc(), end = t0 + ms_to_ticks(ms), now = t0;
	while (now < end) {
		u64 block = random ? xorshift(&rng) % nblocks : ops % nblocks;
		u32 st = blk_request(type, block * (bs / 512), blk_big, bs);
		if (st != BLK_S_OK)
			blk_fail("%s at sector %u: status %u", name, block * (bs / 512), (u64)st);
		u64 t = rdtsc();
		if (t - now > max_lat)
			max_lat = t - now;
		now = t;
		ops++;
	}
	u64 elapsed = now - t0;
	u64 us10 = ticks_to_us10(elapsed);
	u64 mbs10 = us10 ? ops * bs * 100 / us10 : 0; /* bytes/us = MB/s (10^6) */
	u64 lat10 = us10 / ops;
	say("blkbench %s bs=%u ops=%u ms=%u mb_s=%u.%u iops=%u lat_us=%u.%u max_us=%u", name,
	    (u64)bs, ops, us10 / 10000, mbs10 / 10, mbs10 % 10, us10 ? ops * 10000000 / us10 : 0,
	    lat10 / 10, lat10 % 10, ticks_to_us10(max_lat) / 10);
}

static void blk_bench(u64 ms)
{
	for (u64 i = 0; i < sizeof(blk_big); i++)
		blk_big[i] = (u8)(i * 7 + (i >> 12));
	int ro = !!(blk.features & F_BLK_RO);
	if (!ro)
		blk_bench_phase("seq_write", BLK_T_OUT, BENCH_BIG, 0, ms);
	blk_bench_phase("seq_read", BLK_T_IN, BENCH_BIG, 0, ms);
	if (!ro)
		blk_bench_phase("rand_write", BLK_T_OUT, BENCH_SMALL, 1, ms);
	blk_bench_phase("rand_read", BLK_T_IN, BENCH_SMALL, 1, ms);
	if (!ro && (blk.features & F_BLK_FLUSH) && blk_request(BLK_T_FLUSH, 0, 0, 0) != BLK_S_OK)
		blk_fail("flush after the benchmark failed");
	say("blkbench done");
}

/* ------------------------------------------------------------------ */
/* virtio-net                                                         */
/* ------------------------------------------------------------------ */
#define NET_HDR 12 /* virtio_net_hdr_v1 */
#define NET_BUF 2048
#define ETH_ARP 0x0806
#define ETH_IP 0x0800
#define UDP_FRAME 1514 /* Ethernet header + 1500-byte IP packet */

static struct ring_pages net_rx_rings, net_tx_rings;
static u8 net_rx_buf[QSIZE][NET_BUF] __attribute__((aligned(4096)));
static u8 net_tx_buf[QSIZE][NET_BUF] __attribute__((aligned(4096)));

static struct vdev net;
static struct vq net_rx, net_tx;
static u8 net_mac[6], peer_mac[6];
static u64 net_rx_frames;

#define net_fail(...) say_and_stop(1, "net FAILED " __VA_ARGS__)

static void net_rx_post(u16 i)
{
	net_rx.r->desc[i] = (struct vring_desc){addr_of(net_rx_buf[i]), NET_BUF, D_WRITE, 0};
	vq_put(&net_rx, i);
}

static void net_init(void)
{
	u32 legacy;
	net.base = find_device(ID_NET, &legacy);
	if (!net.base)
		net_fail("%s", legacy ? "only a legacy (version 1) virtio-net device found"
				      : "no virtio-net device found");
	const char *err = dev_negotiate(&net, F_NET_MAC);
	if (!err)
		err = vq_setup(&net, &net_rx, 0, &net_rx_rings);
	if (!err)
		err = vq_setup(&net, &net_tx, 1, &net_tx_rings);
	if (!err)
		err = dev_go(&net);
	if (err)
		net_fail("%s", err);
	if (net.features & F_NET_MAC) {
		for (int i = 0; i < 6; i++)
			net_mac[i] = rd8(&net, R_CONFIG + (u32)i);
	} else {
		static const u8 fallback[6] = {0x02, 0x46, 0x42, 0x56, 0x4d, 0x02};
		memcpy(net_mac, fallback, 6);
	}
	for (u16 i = 0; i < QSIZE; i++)
		net_rx_post(i);
	vq_kick(&net, &net_rx);
	char m[18];
	say("net found base=%x mac=%s", net.base, mac_str(net_mac, m));
}

/* Sends `len` bytes of frame (after the virtio-net header) from tx slot `i`. */
static void net_tx_put(u16 i, u32 len)
{
	memset(net_tx_buf[i], 0, NET_HDR);
	net_tx.r->desc[i] = (struct vring_desc){addr_of(net_tx_buf[i]), NET_HDR + len, 0, 0};
	vq_put(&net_tx, i);
}

static void net_send_arp(u32 ip, u32 peer)
{
	u32 id, len;
	while (vq_take(&net_tx, &id, &len)) /* reclaim earlier requests */
		;
	u8 *f = net_tx_buf[0] + NET_HDR;
	memset(f, 0, 60);
	memset(f, 0xff, 6);
	memcpy(f + 6, net_mac, 6);
	put_be16(f + 12, ETH_ARP);
	put_be16(f + 14, 1);      /* Ethernet */
	put_be16(f + 16, ETH_IP); /* IPv4 */
	f[18] = 6;
	f[19] = 4;
	put_be16(f + 20, 1); /* request */
	memcpy(f + 22, net_mac, 6);
	put_be32(f + 28, ip);
	put_be32(f + 38, peer);
	net_tx_put(0, 60);
	vq_kick(&net, &net_tx);
}

/* Looks at one received frame; 1 if it is the ARP reply we wait for. */
static int net_is_arp_reply(const u8 *f, u32 len, u32 ip, u32 peer)
{
	if (len < 42 || get_be16(f + 12) != ETH_ARP || get_be16(f + 20) != 2)
		return 0;
	if (get_be32(f + 28) != peer || get_be32(f + 38) != ip)
		return 0;
	memcpy(peer_mac, f + 22, 6);
	return 1;
}

/* Returns received buffers to the device; 1 if one was the ARP reply. */
static int net_poll_rx(u32 ip, u32 peer)
{
	u32 id, len;
	int got = 0, any = 0;
	while (vq_take(&net_rx, &id, &len)) {
		if (id >= QSIZE)
			net_fail("receive ring returned descriptor %u", (u64)id);
		net_rx_frames++;
		if (len > NET_HDR && net_is_arp_reply(net_rx_buf[id] + NET_HDR, len - NET_HDR, ip, peer))
			got = 1;
		net_rx_post((u16)id);
		any = 1;
	}
	if (any)
		vq_kick(&net, &net_rx);
	return got;
}

static void net_arp(u32 ip, u32 peer)
{
	char a[16], m[18];
	u64 start = rdtsc(), next_send = start;
	for (;;) {
		u64 now = rdtsc();
		if (now - start > ms_to_ticks(TIMEOUT_MS))
			net_fail("no ARP reply from %s", ip_str(peer, a));
		if (now >= next_send) {
			net_send_arp(ip, peer);
			next_send = now + ms_to_ticks(1000);
		}
		if (net_poll_rx(ip, peer))
			break;
		cpu_relax();
	}
	say("net ok arp_reply_from=%s peer_mac=%s rx_frames=%u", ip_str(peer, a),
	    mac_str(peer_mac, m), net_rx_frames);
}

/* The IPv4 header checksum of the 20 bytes at `h`. */
static u32 ip_checksum(const u8 *h)
{
	u32 sum = 0;
	for (int i = 0; i < 20; i += 2)
		sum += get_be16(h + i);
	while (sum >> 16)
		sum = (sum & 0xffff) + (sum >> 16);
	return ~sum & 0xffff;
}

/* A 1514-byte UDP frame to the peer's discard port (9) in tx slot i. */
static void net_udp_frame(u16 i, u32 ip, u32 peer)
{
	u8 *f = net_tx_buf[i] + NET_HDR;
	memcpy(f, peer_mac, 6);
	memcpy(f + 6, net_mac, 6);
	put_be16(f + 12, ETH_IP);
	u8 *h = f + 14;
	memset(h, 0, 28);
	h[0] = 0x45;
	put_be16(h + 2, UDP_FRAME - 14);
	put_be16(h + 4, i);
	put_be16(h + 6, 0x4000); /* don't fragment */
	h[8] = 64;
	h[9] = 17;
	put_be32(h + 12, ip);
	put_be32(h + 16, peer);
	put_be16(h + 10, ip_checksum(h));
	put_be16(h + 20, 4000);
	put_be16(h + 22, 9);
	put_be16(h + 24, UDP_FRAME - 34); /* checksum 0: none */
	for (u32 j = 42; j < UDP_FRAME; j++)
		f[j] = (u8)j;
}

/* Transmits UDP frames for `ms` ms, keeping the transmit ring full. */
static void net_bench(u64 ms, u32 ip, u32 peer)
{
	u32 id, len;
	while (vq_take(&net_tx, &id, &len))
		;
	for (u16 i = 0; i < QSIZE; i++)
		net_udp_frame(i, ip, peer);
	u64 sent = 0, inflight = 0, free_head = 0;
	u16 free_list[QSIZE];
	for (u16 i = 0; i < QSIZE; i++)
		free_list[i] = i;
	free_head = QSIZE;
	u64 t0 = rdtsc(), end = t0 + ms_to_ticks(ms), now = t0;
	while (now < end || inflight) {
		while (vq_take(&net_tx, &id, &len)) {
			if (id >= QSIZE)
				net_fail("transmit ring returned descriptor %u", (u64)id);
			free_list[free_head++] = (u16)id;
			inflight--;
			sent++;
		}
		if (now < end && free_head) {
			while (free_head) {
				u16 i = free_list[--free_head];
				net_tx_put(i, UDP_FRAME);
				inflight++;
			}
			vq_kick(&net, &net_tx);
		}
		net_poll_rx(ip, peer);
		if (now > end + ms_to_ticks(TIMEOUT_MS))
			net_fail("transmit ring stalled with %u frames in flight", inflight);
		now = rdtsc();
	}
	u64 us10 = ticks_to_us10(now - t0);
	u64 mbs10 = us10 ? sent * UDP_FRAME * 100 / us10 : 0;
	say("netbench udp frames=%u bytes=%u ms=%u mb_s=%u.%u pps=%u", sent, sent * UDP_FRAME,
	    us10 / 10000, mbs10 / 10, mbs10 % 10, us10 ? sent * 10000000 / us10 : 0);
}

/* ------------------------------------------------------------------ */
/* virtio-rng                                                         */
/* ------------------------------------------------------------------ */
#define RNG_BYTES 64

static struct ring_pages rng_rings;
static u8 rng_buf[RNG_BYTES] __attribute__((aligned(64)));

#define rng_fail(...) say_and_stop(1, "rng FAILED " __VA_ARGS__)

/* Asks for RNG_BYTES bytes twice; they must arrive, and differ. */
static void rng_run(void)
{
	struct vdev rng;
	struct vq q;
	u32 legacy;
	rng.base = find_device(ID_RNG, &legacy);
	if (!rng.base)
		rng_fail("%s", legacy ? "only a legacy (version 1) virtio-rng device found"
				      : "no virtio-rng device found");
	const char *err = dev_negotiate(&rng, 0);
	if (!err)
		err = vq_setup(&rng, &q, 0, &rng_rings);
	if (!err)
		err = dev_go(&rng);
	if (err)
		rng_fail("%s", err);
	u64 first = 0, same = 1;
	for (int round = 0; round < 2; round++) {
		memset(rng_buf, 0, sizeof(rng_buf));
		q.r->desc[0] = (struct vring_desc){addr_of(rng_buf), RNG_BYTES, D_WRITE, 0};
		vq_put(&q, 0);
		vq_kick(&rng, &q);
		u32 id, len;
		if (!vq_wait(&q, &id, &len))
			rng_fail("timeout: request not completed");
		if (len != RNG_BYTES)
			rng_fail("asked for %u bytes, got %u", (u64)RNG_BYTES, (u64)len);
		u64 word = 0;
		for (int i = 0; i < 8; i++)
			word = word << 8 | rng_buf[i];
		if (round == 0)
			first = word;
		else
			same = word == first;
	}
	if (same)
		rng_fail("two requests returned the same bytes");
	say("rng ok base=%x bytes=%u", rng.base, (u64)(2 * RNG_BYTES));
}

/* ------------------------------------------------------------------ */
void virtio_run(const struct virtio_args *a)
{
	if (a->blk || a->blkbench) {
		blk_init();
		if (blk_sectors < BLK_ROUND_SECTORS)
			blk_fail("disk has %u sectors, fewer than %u", blk_sectors,
				 (u64)BLK_ROUND_SECTORS);
		for (u64 r = 1; r <= a->blk; r++) {
			blk_round(r);
			if (a->blkwait && r < a->blk) {
				u64 until = rdtsc() + ms_to_ticks(a->blkwait);
				while (rdtsc() < until)
					cpu_relax();
			}
		}
		if (a->blkbench)
			blk_bench(a->blkbench);
	}
	if (a->rng)
		rng_run();
	if (a->net || a->netbench) {
		net_init();
		net_arp((u32)a->net_ip, (u32)a->net_peer);
		if (a->netbench)
			net_bench(a->netbench, (u32)a->net_ip, (u32)a->net_peer);
	}
}
