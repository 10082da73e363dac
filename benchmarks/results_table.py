"""Markdown tables from committed benchmark results, so that the READMEs'
figures come from the result files, never typed by hand.

    python benchmarks/results_table.py benchmarks/results/*/bench_*.json       # print the tables
    python benchmarks/results_table.py --readme README.md --plot benchmarks/results/nvidia-h200/bench_block_cuda.png \\
        benchmarks/results/cpu-2core/bench_block_cpu.json benchmarks/results/nvidia-h200/bench_block_cuda.json

With --readme the tables (and the plot, if given) replace what stands between
the lines `<!-- results:start -->` and `<!-- results:end -->` in that file.
Each file's kind (bench_block, bench_ops, bench_train) is read from its name.
"""
import argparse
import json
import os

START, END = "<!-- results:start -->", "<!-- results:end -->"


def fmt(ms):
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.3g}"


def header(r, path, what):
    commit = r.get("git_commit") or "not recorded"
    return (f"{r['device_name']}, torch {r['torch']}, {r['date'][:10]}, commit {commit} "
            f"(`{path}`): {what}")


def block_table(r, path):
    """One table per dtype: forward+backward ms of each implementation, the
    peer's time over nanoblock's, and saved-for-backward memory."""
    out = []
    for dtype in dict.fromkeys(x["dtype"] for x in r["rows"]):
        rows = [x for x in r["rows"] if x["dtype"] == dtype]
        impls = list(dict.fromkeys(x["impl"] for x in rows))
        out += [header(r, path, f"one Block, {dtype}, forward+backward ms, and the peer's time "
                                "over nanoblock's (> 1: nanoblock faster)"),
                "",
                "| config (B, T, C, heads) | " + " | ".join(impls)
                + " | saved for backward, nanoblock / eager |",
                "|---" * (len(impls) + 2) + "|"]
        for config in dict.fromkeys(x["config"] for x in rows):
            by = {x["impl"]: x for x in rows if x["config"] == config}
            nb = by.get("nanoblock", {}).get("forward_backward_ms")
            cells = []
            for impl in impls:
                ms = by.get(impl, {}).get("forward_backward_ms")
                if ms is None:
                    cells.append("-")
                else:
                    cells.append(fmt(ms) if impl == "nanoblock" or not nb
                                 else f"{fmt(ms)} ({ms / nb:.2f}x)")
            x = next(iter(by.values()))
            saved = (f"{by['nanoblock']['saved_mib'] / by['eager']['saved_mib']:.2f}"
                     if "nanoblock" in by and "eager" in by and by["eager"]["saved_mib"] else "-")
            out.append(f"| {config} ({x['B']}, {x['T']}, {x['C']}, {x['n_head']}) | "
                       + " | ".join(cells) + f" | {saved} |")
        out.append("")
    return "\n".join(out)


def ops_table(r, path):
    """Forward+backward of each op and shape: nanoblock's and PyTorch's
    throughput, as a fraction of the measured ceiling, and the time ratio."""
    ceil = ", ".join(f"{c['dtype']}: copy {c['copy_gbs']:.0f} GB/s, matmul "
                     f"{c['matmul_tflops']:.3g} TFLOP/s" for c in r["ceilings"])
    out = [header(r, path, f"ops forward+backward; ceilings measured in the same run ({ceil})"),
           "",
           "| op | shape | dtype | nanoblock | PyTorch | PyTorch's time / nanoblock's "
           "| a copy of the same bytes |",
           "|---|---|---|---|---|---|---|"]
    rows = [x for x in r["rows"] if x["mode"] == "forward_backward"]
    shape_keys = ("B", "T", "H", "D", "N", "C")
    groups = dict.fromkeys((x["op"], x["dtype"], tuple((k, x[k]) for k in shape_keys if k in x))
                           for x in rows)
    for op, dtype, shape in groups:
        by = {x["impl"]: x for x in rows
              if (x["op"], x["dtype"], tuple((k, x[k]) for k in shape_keys if k in x))
              == (op, dtype, shape)}
        nb = by.pop("nanoblock")
        copy = by.pop("copy", None)  # bench_ops' same-bytes copy (bandwidth ops)
        peer = next(iter(by.values()))

        def cell(x):
            return f"{x['achieved']:.3g} {x['unit']} ({100 * x['fraction_of_ceiling']:.0f}%)"
        out.append(f"| {op} | {', '.join(f'{k}={v}' for k, v in shape)} | {dtype} | {cell(nb)} | "
                   f"{peer['impl']}: {cell(peer)} | {peer['ms'] / nb['ms']:.2f}x | "
                   f"{cell(copy) if copy else ''} |")
    return "\n".join(out) + "\n"


def train_table(r, path):
    c = r["config"]
    out = [header(r, path, f"training a GPT ({r.get('params_millions', 0):.0f}M parameters: "
                           f"{c['n_layer']} layers, n_embd {c['n_embd']}, {c['n_head']} heads, "
                           f"vocab {c['vocab_size']}), B={c['B']}, T={c['T']}, {c['dtype']}, "
                           f"forward+backward+AdamW"),
           "",
           "| implementation | ms per step | tokens/s | nanoblock's tokens/s over this | peak MiB |",
           "|---|---|---|---|---|"]
    nb = next((x for x in r["rows"] if x["impl"] == "nanoblock"), None)
    for x in r["rows"]:
        ratio = f"{x['step_ms'] / nb['step_ms']:.2f}x" if nb and x is not nb else "-"
        peak = f"{x['peak_mib']:.0f}" if x["peak_mib"] is not None else "-"
        out.append(f"| {x['impl']} | {fmt(x['step_ms'])} | {x['tokens_per_s']:.0f} | {ratio} "
                   f"| {peak} |")
    return "\n".join(out) + "\n"


def tables(paths):
    makers = {"bench_block": block_table, "bench_ops": ops_table, "bench_train": train_table}
    out = []
    for path in paths:
        kind = next((k for k in makers if os.path.basename(path).startswith(k)), None)
        if kind is None:
            raise SystemExit(f"{path}: not a bench_block, bench_ops or bench_train result")
        with open(path) as f:
            out.append(makers[kind](json.load(f), path))
    return "\n".join(out)


def update_readme(readme, text):
    with open(readme) as f:
        s = f.read()
    if START not in s or END not in s:
        raise SystemExit(f"{readme} has no {START} ... {END} section to fill")
    head, rest = s.split(START, 1)
    tail = rest.split(END, 1)[1]
    with open(readme, "w") as f:
        f.write(f"{head}{START}\n{text}\n{END}{tail}")
    print(f"updated {readme}")


def main(argv=None):
    p = argparse.ArgumentParser(description="Markdown tables from benchmark result files.")
    p.add_argument("files", nargs="+")
    p.add_argument("--readme", help="fill this file's results section instead of printing")
    p.add_argument("--plot", help="with --readme: a PNG shown under the tables")
    args = p.parse_args(argv)
    text = ("Tables made by `python benchmarks/results_table.py` from the committed result "
            "files named in each.\n\n" + tables(args.files))
    if not args.readme:
        print(text)
        return
    if args.plot:
        rel = os.path.relpath(args.plot, os.path.dirname(os.path.abspath(args.readme)))
        text += f"\n![{os.path.basename(args.plot)}]({rel})\n"
    update_readme(args.readme, text)


if __name__ == "__main__":
    main()
