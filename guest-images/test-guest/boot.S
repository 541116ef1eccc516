/*
 * fabvm test guest: PVH entry, ring-0 setup, AP trampoline.
 *
 * Ring 0 is deliberately tiny. On kvm_pvm every CPL0 instruction goes
 * through KVM's instruction emulator (~1M instructions/s), so this file only:
 *   - loads a GDT, finds the top of RAM in the PVH memory map,
 *   - builds identity page tables with 2 MiB pages (user bit at every level),
 *     plus the pages holding the local APIC and the virtio-mmio windows,
 *   - enters long mode, loads a per-CPU TSS whose I/O bitmap allows all ports,
 *   - and irets into ring 3 (IOPL=3, IF=0), where main.c does everything else.
 * Application processors arrive through the real-mode trampoline below
 * (copied to TRAMPOLINE_ADDR by ring 3) and join the same path.
 *
 * Instructions known to fail in the emulator (int3, fwait, xrstor,
 * cmpxchg16b, popcnt) are not used; there is no IDT (limit 0), so any fault
 * ends in a triple fault, which is a visible failure.
 */
#include "config.h"

#define PTE_P 0x001
#define PTE_RW 0x002
#define PTE_US 0x004
#define PTE_PWT 0x008
#define PTE_PCD 0x010
#define PTE_PS 0x080
#define PDE_2M (PTE_P | PTE_RW | PTE_US | PTE_PS)
#define PTE_TABLE (PTE_P | PTE_RW | PTE_US)

#define HVM_START_MAGIC 0x336ec578

/* ------------------------------------------------------------------ */
/* PVH entry note: XEN_ELFNOTE_PHYS32_ENTRY (18), name "Xen".          */
/* The descriptor is 8 bytes (QEMU reads a 64-bit value for ELF64;     */
/* readers that want 32 bits take the low half).                       */
/* ------------------------------------------------------------------ */
	.section .note.Xen, "a"
	.balign 4
	.long 4			/* namesz: "Xen\0" */
	.long 8			/* descsz */
	.long 18		/* XEN_ELFNOTE_PHYS32_ENTRY */
	.asciz "Xen"
	.balign 4
	.quad pvh_start32
	.balign 4

/* ------------------------------------------------------------------ */
/* BSP entry: 32-bit protected mode, paging off, %ebx = hvm_start_info */
/* ------------------------------------------------------------------ */
	.section .text.boot, "ax"
	.code32
	.globl pvh_start32
pvh_start32:
	cli
	movl %ebx, start_info_pa
	lgdt gdt_ptr
	ljmp $SEL_K32, $1f
1:	movl $SEL_KDATA, %eax
	movl %eax, %ds
	movl %eax, %es
	movl %eax, %ss

	/* %ebp:%esi = highest end of a type-1 (RAM) memmap entry. */
	xorl %esi, %esi
	xorl %ebp, %ebp
	cmpl $HVM_START_MAGIC, (%ebx)
	jne .Lnomap
	cmpl $1, 4(%ebx)		/* version >= 1 has the memmap */
	jb .Lnomap
	movl 48(%ebx), %ecx		/* memmap_entries */
	testl %ecx, %ecx
	jz .Lnomap
	movl 40(%ebx), %edi		/* memmap_paddr (low 32 bits) */
.Lmm:
	cmpl $1, 16(%edi)		/* type == RAM? */
	jne .Lmmnext
	movl (%edi), %eax
	movl 4(%edi), %edx
	addl 8(%edi), %eax
	adcl 12(%edi), %edx		/* %edx:%eax = addr + size */
	cmpl %ebp, %edx
	jb .Lmmnext
	ja .Lmmnew
	cmpl %esi, %eax
	jbe .Lmmnext
.Lmmnew:
	movl %eax, %esi
	movl %edx, %ebp
.Lmmnext:
	addl $24, %edi
	decl %ecx
	jnz .Lmm
	jmp .Lhavetop
.Lnomap:
	/* No usable memmap: map 1 GiB; ring 3 reports the error. */
	movl $0x40000000, %esi
	xorl %ebp, %ebp
.Lhavetop:
	/* %esi = number of 2 MiB pages = ceil(top / 2 MiB), capped. */
	addl $0x1fffff, %esi
	adcl $0, %ebp
	shrdl $21, %ebp, %esi
	shrl $21, %ebp
	jnz .Lcap
	cmpl $MAX_2M_PAGES, %esi
	jbe .Lnocap
.Lcap:
	movl $MAX_2M_PAGES, %esi
.Lnocap:
	cmpl $image_min_2m, %esi	/* always cover the image itself */
	jae 2f
	movl $image_min_2m, %esi
2:	movl %esi, mapped_2m

	/* Page directory entries: identity, 2 MiB, write-back. */
	movl $pd_tables, %edi
	movl $PDE_2M, %eax
	xorl %edx, %edx
	movl %esi, %ecx
3:	movl %eax, (%edi)
	movl %edx, 4(%edi)
	addl $8, %edi
	addl $0x200000, %eax
	adcl $0, %edx
	decl %ecx
	jnz 3b

	/* The 2 MiB page holding the local APIC: identity, uncached. */
	movl $(APIC_BASE | PDE_2M | PTE_PWT | PTE_PCD), pd_tables + (APIC_BASE >> 21) * 8
	movl $0, pd_tables + (APIC_BASE >> 21) * 8 + 4

	/* The 2 MiB pages holding the virtio-mmio windows: identity, uncached. */
	movl $((VIRTIO_FABVM_BASE & 0xFFE00000) | PDE_2M | PTE_PWT | PTE_PCD), pd_tables + (VIRTIO_FABVM_BASE >> 21) * 8
	movl $0, pd_tables + (VIRTIO_FABVM_BASE >> 21) * 8 + 4
	movl $((VIRTIO_QEMU_BASE & 0xFFE00000) | PDE_2M | PTE_PWT | PTE_PCD), pd_tables + (VIRTIO_QEMU_BASE >> 21) * 8
	movl $0, pd_tables + (VIRTIO_QEMU_BASE >> 21) * 8 + 4

	/* PDPT: one entry per 1 GiB page directory in use, at least 4
	   (the fourth holds the APIC). Unused PD entries are zero (bss). */
	addl $511, %esi
	shrl $9, %esi
	cmpl $4, %esi
	jae 4f
	movl $4, %esi
4:	movl $pdpt, %edi
	movl $(pd_tables + PTE_TABLE), %eax
5:	movl %eax, (%edi)
	addl $8, %edi
	addl $4096, %eax
	decl %esi
	jnz 5b

	movl $(pdpt + PTE_TABLE), pml4

	xorl %edi, %edi			/* CPU index 0 */
	/* fall through */

/* ------------------------------------------------------------------ */
/* Common path, 32-bit protected mode, %edi = CPU index.               */
/* ------------------------------------------------------------------ */
common32:
	movl %cr4, %eax
	orl $0x20, %eax			/* PAE */
	movl %eax, %cr4
	movl $pml4, %eax
	movl %eax, %cr3
	movl $0xC0000080, %ecx		/* EFER */
	rdmsr
	orl $0x100, %eax		/* LME */
	wrmsr
	movl %cr0, %eax
	orl $0x80000001, %eax		/* PG | PE */
	movl %eax, %cr0
	ljmp $SEL_K64, $long64

/* ------------------------------------------------------------------ */
/* AP entry from the trampoline, 32-bit protected mode.                */
/* ------------------------------------------------------------------ */
	.globl ap_start32
ap_start32:
	movl $SEL_KDATA, %eax
	movl %eax, %ds
	movl %eax, %es
	movl %eax, %ss
	movl ap_next_cpu, %edi
	jmp common32

/* ------------------------------------------------------------------ */
/* 64-bit: per-CPU TSS, ltr, iretq to ring 3.                          */
/* ------------------------------------------------------------------ */
	.code64
long64:
	movl $SEL_KDATA, %eax
	movl %eax, %ds
	movl %eax, %es
	movl %eax, %ss
	xorl %eax, %eax
	movl %eax, %fs
	movl %eax, %gs
	lidt idt_null(%rip)
	movl %edi, %edi			/* zero-extend the CPU index */

	/* %rbx = this CPU's TSS */
	imull $TSS_STRIDE, %edi, %ebx
	addq $tss_area, %rbx
	movw $TSS_HDR, 102(%rbx)		/* I/O map base */
	movb $0xff, (TSS_HDR + TSS_IOPB_BYTES)(%rbx)	/* bitmap terminator */

	/* %rcx = its GDT descriptor (16 bytes, type 9 = available TSS) */
	movl %edi, %ecx
	shll $4, %ecx
	addq $gdt_tss, %rcx
	movl %ebx, %eax
	shll $16, %eax
	orl $TSS_LIMIT, %eax		/* limit[15:0] | base[15:0] << 16 */
	movl %eax, (%rcx)
	movl %ebx, %eax
	shrl $16, %eax
	andl $0xff, %eax		/* base[23:16] */
	orl $0x8900, %eax		/* P=1, DPL=0, type=9 */
	movl %ebx, %edx
	andl $0xff000000, %edx		/* base[31:24] */
	orl %edx, %eax
	movl %eax, 4(%rcx)
	movq $0, 8(%rcx)		/* base[63:32] = 0 */
	movl %edi, %eax
	shll $4, %eax
	addl $SEL_TSS0, %eax
	ltr %ax

	/* Stack: top of this CPU's slot; ring 3 starts 8 below (ABI). */
	leal 1(%edi), %eax
	shll $STACK_SHIFT, %eax
	addq $stacks, %rax
	movq %rax, %rsp
	leaq -8(%rax), %rdx
	pushq $(SEL_UDATA | 3)		/* SS */
	pushq %rdx			/* RSP */
	pushq $0x3002			/* RFLAGS: IOPL=3, IF=0 */
	pushq $(SEL_UCODE | 3)		/* CS */
	pushq $ring3_entry		/* RIP; %rdi = CPU index = 1st arg */
	iretq

/* ------------------------------------------------------------------ */
/* AP trampoline: copied to TRAMPOLINE_ADDR; starts in real mode at     */
/* CS = TRAMPOLINE_ADDR >> 4, IP = 0. Position independent within       */
/* itself; everything else it needs is at absolute addresses.          */
/* ------------------------------------------------------------------ */
	.code16
	.globl tramp_start, tramp_end
tramp_start:
	cli
	movw %cs, %ax
	movw %ax, %ds
	lgdtl (tramp_gdt_ptr - tramp_start)
	movl %cr0, %eax
	orl $1, %eax
	movl %eax, %cr0
	ljmpl $SEL_K32, $ap_start32
	.balign 4
tramp_gdt_ptr:
	.word gdt_end - gdt - 1
	.long gdt
tramp_end:

/* ------------------------------------------------------------------ */
	.section .data
	.balign 16
	.globl gdt
gdt:
	.quad 0
	.quad 0x00CF9B000000FFFF	/* 0x08 kernel code 32 */
	.quad 0x00AF9B000000FFFF	/* 0x10 kernel code 64 */
	.quad 0x00CF93000000FFFF	/* 0x18 kernel data */
	.quad 0x00CFF3000000FFFF	/* 0x20 user data, DPL 3 */
	.quad 0x00AFFB000000FFFF	/* 0x28 user code 64, DPL 3 */
gdt_tss:
	.fill MAX_CPUS * 2, 8, 0	/* 0x30.. one 16-byte TSS descriptor per CPU */
gdt_end:

	.balign 8
	.word 0
gdt_ptr:
	.word gdt_end - gdt - 1
	.long gdt

	.balign 8
	.word 0, 0, 0
idt_null:
	.word 0
	.quad 0

	.balign 4
	.globl start_info_pa, mapped_2m, ap_next_cpu
start_info_pa:	.long 0		/* physical address of hvm_start_info */
mapped_2m:	.long 0		/* 2 MiB pages identity-mapped from 0 */
ap_next_cpu:	.long 0		/* CPU index the next AP to start takes */

/* ------------------------------------------------------------------ */
/* Zeroed state (the loader leaves it zero: fresh guest RAM).          */
/* ------------------------------------------------------------------ */
	.section .bss, "aw", @nobits
	.balign 4096
pml4:	.skip 4096
pdpt:	.skip 4096
pd_tables:
	.skip PD_PAGES * 4096
	.balign 128
tss_area:
	.skip MAX_CPUS * TSS_STRIDE
	.balign 4096
stacks:
	.skip MAX_CPUS * STACK_SIZE
