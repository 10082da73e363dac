"""Prints a markdown table of committed Block benchmark results, for the
README (so the README's figures come from the result files, not by hand).

    python benchmarks/results_table.py benchmarks/results/*/bench_block_*.json
"""
import json
import sys


def table(path):
    r = json.load(open(path))
    rows = r["rows"]
    impls = list(dict.fromkeys(x["impl"] for x in rows))
    out = [f"{r['device_name']}, torch {r['torch']}, {rows[0]['dtype']}, {r['date'][:10]} "
           f"(`{path}`): forward+backward ms, and the peer's time over nanoblock's",
           "",
           "| config (B, T, C, heads) | " + " | ".join(impls) + " | saved for backward, nanoblock / eager |",
           "|---" * (len(impls) + 2) + "|"]
    for config in dict.fromkeys(x["config"] for x in rows):
        by = {x["impl"]: x for x in rows if x["config"] == config}
        nb = by.get("nanoblock", {}).get("forward_backward_ms")
        cells = []
        for impl in impls:
            if impl not in by:
                cells.append("-")
                continue
            ms = by[impl]["forward_backward_ms"]
            cells.append(f"{ms:.3g}" if impl == "nanoblock" or not nb else f"{ms:.3g} ({ms / nb:.2f}x)")
        x = next(iter(by.values()))
        saved = (f"{by['nanoblock']['saved_mib'] / by['eager']['saved_mib']:.2f}"
                 if "nanoblock" in by and "eager" in by and by["eager"]["saved_mib"] else "-")
        out.append(f"| {config} ({x['B']}, {x['T']}, {x['C']}, {x['n_head']}) | "
                   + " | ".join(cells) + f" | {saved} |")
    return "\n".join(out)


if __name__ == "__main__":
    print("\n\n".join(table(p) for p in sys.argv[1:]))
