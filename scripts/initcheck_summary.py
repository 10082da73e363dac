"""Sums up a compute-sanitizer initcheck log: how many reports each kernel
drew, which tests drew them, and whether any came from nanoblock's kernels
(exit status 1 if so).

    python scripts/initcheck_summary.py initcheck.log

A report starts with a line naming the access ("Uninitialized __global__
memory read of size 4 bytes"); the next "at ..." line names the kernel (or
the device function inside it) that made the read, and any "Device Frame"
lines below it name the functions it was called from. A report counts as
nanoblock's when one of those names holds "nanoblock". Kernels print as
"void name<...>(...)"; a report whose names hold neither a kernel nor
"nanoblock" (a device function such as c10::BFloat16's conversion, seen
with --show-backtrace no) cannot be placed and counts as nanoblock's too:
rerun with backtraces to place it.

When one launch draws more reports than the tool's record buffer holds, it
prints "Error buffer overflow has been detected" after that launch's reports
and drops the rest (the count dropped comes at the end). Those dropped
records belong to the kernel of the report just before the warning: one
after a nanoblock report counts as nanoblock's. With pytest -v, the test
lines in the log say which test each report came from.
"""
import collections
import re
import sys

REPORT = re.compile(r"^=+\s+Uninitialized")
WHERE = re.compile(r"^=+\s+at (.*?)(\+0x[0-9a-f]+)?( in .*)?$")
FRAME = re.compile(r"^=+\s+Device Frame:\s*(.*)$")
OVERFLOW = re.compile(r"Error buffer overflow")
TEST = re.compile(r"(tests/\S+\.py::\S+)")


def logical_lines(lines):
    """The log's lines, with a pytest -v test name that the tool's output
    continues on the same line ("tests/t.py::test_x ========= Uninitialized
    ...") split into two."""
    for line in lines:
        line = line.rstrip("\n")
        cut = line.find("=====")
        if cut > 0 and TEST.search(line[:cut]):
            yield line[:cut]
            line = line[cut:]
        yield line


def events(lines):
    """Yields ("report", access line, [kernel and device frame names], test)
    and ("overflow", None, [names of the report before it], test)."""
    access, names, test, last_names = None, [], "(before any test)", []
    for line in logical_lines(lines):
        is_report, is_overflow = REPORT.match(line), OVERFLOW.search(line)
        is_test = not line.startswith("=") and TEST.search(line)
        if (is_report or is_overflow or is_test) and access is not None:
            yield "report", access, names, test
            access, last_names = None, names
        if is_report:
            access, names = line.strip("= "), []
        elif is_overflow:
            yield "overflow", None, last_names, test
        elif is_test:
            test = is_test.group(1)
        elif access is not None and (where := WHERE.match(line) or FRAME.match(line)):
            names.append(where.group(1))
    if access is not None:
        yield "report", access, names, test


def short(name, width=110):
    return name if len(name) <= width else name[:width - 3] + "..."


def print_counts(counts, out):
    for name, n in counts.most_common(20):
        out(f"  {n:8d}  {name}")


def summarize(lines, out=print):
    """Prints the summary; returns the number of nanoblock's reports and
    overflows (0 when nanoblock's kernels drew none)."""
    per_kernel, per_test, overflows = collections.Counter(), collections.Counter(), collections.Counter()
    ours, ours_overflowed = [], 0
    for kind, access, names, test in events(lines):
        kernel = short(names[0]) if names else "(no kernel named)"
        is_ours = any("nanoblock" in n for n in names) or not any(
            n.startswith("void ") for n in names)
        if kind == "overflow":
            overflows[kernel] += 1
            ours_overflowed += is_ours
            continue
        per_kernel[kernel] += 1
        per_test[test] += 1
        if is_ours:
            ours.append((access, names, test))
    out(f"initcheck: {sum(per_kernel.values())} report(s) in {len(per_kernel)} kernel(s); "
        f"{len(ours)} in nanoblock's kernels or not placed")
    print_counts(per_kernel, out)
    if overflows:
        out(f"record buffer overflows (records dropped) after the reports of: "
            f"{ours_overflowed} in nanoblock's kernels or not placed")
        print_counts(overflows, out)
    if len(per_test) > 1 or "(before any test)" not in per_test:
        out("reports per test:")
        print_counts(per_test, out)
    for access, names, test in ours[:10]:
        out(f"  nanoblock or not placed: {access}  ({test})")
        for n in names:
            out(f"      at {short(n, 160)}")
    return len(ours) + ours_overflowed


def main(path):
    with open(path, errors="replace") as log:
        return 1 if summarize(log) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
