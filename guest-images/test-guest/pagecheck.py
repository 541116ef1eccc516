#!/usr/bin/env python3
"""Reference implementation of the fabvm test guest's page-content function,
and a checker for raw guest memory dumps (e.g. QEMU's `pmemsave 0 SIZE FILE`).

    pagecheck.py page GFN [--seed S] [--sseed T] [--share P] [--gen G]
        print the 4096-byte page as hex words (first and last few)
    pagecheck.py dump FILE --fill-start A --fill-end B [--gen-table ADDR]
                 [--seed S] [--sseed T] [--share P] [--sample N]
        recompute pages of FILE (a dump of guest-physical memory from 0) and
        compare; with --gen-table the generations are read from the dump
    pagecheck.py same FILE1 FILE2 --fill-start A --fill-end B
        count frames with identical content in two dumps

Only the Python standard library. See guest-images/README.md, "Test guest".
"""
import argparse
import random
import struct
import sys

M64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15
MIX_C1 = 0xBF58476D1CE4E5B9
MIX_C2 = 0x94D049BB133111EB
GEN_MUL = 0xD1B54A32D192ED03


def mix64(x):
    x = (x + GOLDEN) & M64
    x = ((x ^ (x >> 30)) * MIX_C1) & M64
    x = ((x ^ (x >> 27)) * MIX_C2) & M64
    return x ^ (x >> 31)


def is_shared(gfn, share):
    return mix64(gfn) % 100 < share


def page_key(gfn, gen, seed, sseed, share):
    m = mix64(gfn)
    s = sseed if m % 100 < share else seed
    return mix64(s ^ m ^ ((gen * GEN_MUL) & M64))


def page_bytes(gfn, gen=0, seed=1, sseed=0xFAB, share=0):
    k = page_key(gfn, gen, seed, sseed, share)
    return struct.pack("<512Q", *(mix64((k + i * GOLDEN) & M64) for i in range(512)))


def num(s):
    return int(s, 0)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cmd", choices=["page", "dump", "same"])
    ap.add_argument("args", nargs="+")
    ap.add_argument("--seed", type=num, default=1)
    ap.add_argument("--sseed", type=num, default=0xFAB)
    ap.add_argument("--share", type=num, default=0)
    ap.add_argument("--gen", type=num, default=0)
    ap.add_argument("--fill-start", type=num)
    ap.add_argument("--fill-end", type=num)
    ap.add_argument("--gen-table", type=num)
    ap.add_argument("--sample", type=int, default=0, help="check N random pages (0 = all)")
    a = ap.parse_args()

    if a.cmd == "page":
        gfn = num(a.args[0])
        words = struct.unpack("<512Q", page_bytes(gfn, a.gen, a.seed, a.sseed, a.share))
        print(f"gfn {gfn:#x} shared={is_shared(gfn, a.share)} key={page_key(gfn, a.gen, a.seed, a.sseed, a.share):#018x}")
        for i in list(range(4)) + list(range(508, 512)):
            print(f"  word[{i}] = {words[i]:#018x}")
        return 0

    if a.fill_start is None or a.fill_end is None:
        ap.error("--fill-start and --fill-end are required")
    first, last = a.fill_start >> 12, a.fill_end >> 12

    if a.cmd == "same":
        with open(a.args[0], "rb") as f1, open(a.args[1], "rb") as f2:
            same = total = 0
            for g in range(first, last):
                f1.seek(g << 12)
                f2.seek(g << 12)
                total += 1
                same += f1.read(4096) == f2.read(4096)
        print(f"frames={total} identical={same} ({100.0 * same / max(total, 1):.2f}%)")
        return 0

    with open(a.args[0], "rb") as f:
        gfns = range(first, last)
        if a.sample:
            gfns = sorted(random.sample(gfns, min(a.sample, len(gfns))))
        bad = checked = shared = dirtied = 0
        for g in gfns:
            gen = 0
            if a.gen_table is not None:
                f.seek(a.gen_table + 2 * (g - first))
                gen = struct.unpack("<H", f.read(2))[0]
            f.seek(g << 12)
            data = f.read(4096)
            checked += 1
            shared += is_shared(g, a.share)
            dirtied += gen != 0
            if data != page_bytes(g, gen, a.seed, a.sseed, a.share):
                bad += 1
                if bad <= 5:
                    print(f"mismatch at gfn {g:#x} (gen {gen})")
    print(f"checked={checked} mismatched={bad} shared_class={shared} nonzero_gen={dirtied}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
