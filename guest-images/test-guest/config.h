/*
 * fabvm test guest: constants shared by the ring-0 assembly (boot.S) and
 * the ring-3 workload (main.c). Plain #defines only: this file is included
 * from both assembly and C.
 */
#ifndef FABVM_TEST_GUEST_CONFIG_H
#define FABVM_TEST_GUEST_CONFIG_H

/* Most CPUs the guest will start (cpus=N, N <= MAX_CPUS). */
#define MAX_CPUS 64

/* Per-CPU stack (ring 0 uses it for a handful of pushes, then ring 3). */
#define STACK_SHIFT 13
#define STACK_SIZE (1 << STACK_SHIFT)

/*
 * Per-CPU 64-bit TSS: 104-byte header, then an I/O permission bitmap of
 * 8192 zero bytes (every port allowed) and the terminating 0xff byte.
 * The TSS limit is the offset of that last byte.
 */
#define TSS_HDR 104
#define TSS_IOPB_BYTES 8192
#define TSS_LIMIT (TSS_HDR + TSS_IOPB_BYTES)
#define TSS_STRIDE 8320 /* >= TSS_LIMIT + 1, multiple of 128 */

/* GDT selectors. */
#define SEL_K32 0x08   /* kernel code, 32-bit */
#define SEL_K64 0x10   /* kernel code, 64-bit */
#define SEL_KDATA 0x18 /* kernel data */
#define SEL_UDATA 0x20 /* user data, DPL 3 (use with RPL 3: 0x23) */
#define SEL_UCODE 0x28 /* user code, 64-bit, DPL 3 (RPL 3: 0x2b) */
#define SEL_TSS0 0x30  /* first TSS descriptor; CPU i uses SEL_TSS0 + 16*i */

/* Identity map: 2 MiB pages up to this many (64 GiB). */
#define MAX_2M_PAGES 32768
#define PD_PAGES (MAX_2M_PAGES / 512)

/* Where the AP real-mode trampoline is copied (SIPI vector 0x10). */
#define TRAMPOLINE_ADDR 0x10000
#define SIPI_VECTOR (TRAMPOLINE_ADDR >> 12)

/* Local APIC (xAPIC MMIO). */
#define APIC_BASE 0xFEE00000

/*
 * virtio-mmio register windows, scanned in this order for devices: fabvm's
 * slots (vmm/src/layout.rs: 4 KiB apart from 0xd0000000) and QEMU microvm's
 * transports (512 bytes apart from 0xfeb00000). boot.S maps the 2 MiB page
 * holding each window, uncached.
 */
#define VIRTIO_FABVM_BASE 0xD0000000
#define VIRTIO_FABVM_STRIDE 0x1000
#define VIRTIO_FABVM_SLOTS 11
#define VIRTIO_QEMU_BASE 0xFEB00000
#define VIRTIO_QEMU_STRIDE 0x200
#define VIRTIO_QEMU_SLOTS 24

#endif
