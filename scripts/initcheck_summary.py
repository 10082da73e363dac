"""Sums up a compute-sanitizer initcheck log: how many reports each kernel
drew, and whether any came from nanoblock's kernels (exit status 1 if so).

    python scripts/initcheck_summary.py initcheck.log

A report starts with a line naming the access ("Uninitialized __global__
memory read of size 4 bytes"); the next "at ..." line names the kernel (or
the device function inside it) that made the read, and any "Device Frame"
lines below it name the functions it was called from. A report counts as
nanoblock's when one of those names holds "nanoblock".
"""
import collections
import re
import sys

REPORT = re.compile(r"^=+\s+Uninitialized")
WHERE = re.compile(r"^=+\s+at (.*?)(\+0x[0-9a-f]+)?( in .*)?$")
FRAME = re.compile(r"^=+\s+Device Frame:\s*(.*)$")


def reports(lines):
    """Yields (access line, [names of the kernel and its device frames])."""
    access, names = None, []
    for line in lines:
        line = line.rstrip("\n")
        if REPORT.match(line):
            if access is not None:
                yield access, names
            access, names = line.strip("= "), []
        elif access is not None:
            where = WHERE.match(line) or FRAME.match(line)
            if where:
                names.append(where.group(1))
    if access is not None:
        yield access, names


def short(name, width=110):
    return name if len(name) <= width else name[:width - 3] + "..."


def main(path):
    per_kernel = collections.Counter()
    ours = []
    with open(path, errors="replace") as log:
        for access, names in reports(log):
            kernel = names[0] if names else "(no kernel named)"
            per_kernel[short(kernel)] += 1
            if any("nanoblock" in n for n in names):
                ours.append((access, names))
    total = sum(per_kernel.values())
    print(f"initcheck: {total} report(s) in {len(per_kernel)} kernel(s); "
          f"{len(ours)} in nanoblock's kernels")
    for kernel, n in per_kernel.most_common(20):
        print(f"  {n:8d}  {kernel}")
    for access, names in ours[:10]:
        print(f"  nanoblock: {access}")
        for n in names:
            print(f"      at {short(n, 160)}")
    return 1 if ours else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
