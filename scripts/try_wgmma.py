#!/usr/bin/env python3
"""Build, check and time the wgmma attention forward prototype.

    python scripts/try_wgmma.py               # build, check, time (H100 / H200)
    python scripts/try_wgmma.py --quick       # small shapes, no timing (e.g. under
                                              # compute-sanitizer --tool memcheck)
    python scripts/try_wgmma.py --build-only  # stop after the build

Builds csrc/cuda/attention_wgmma.cu and attention_wgmma_backward.cu (sm_90a;
try_wgmma_backward.py checks the backward), csrc/cuda/attention_mma.cu (our
mma.sync kernels, for comparison) and scripts/wgmma_binding.cpp with
torch.utils.cpp_extension.load, then for bfloat16 and float16 over a few
shapes compares out and lse with a float64 reference on the same q, k, v
(also printing the errors of our mma forward, of SDPA in the same dtype and
of SDPA in float32), and times the wgmma kernel (each tile shape built)
against the mma forward and SDPA at gpt2-small sizes.

Pass rule (DESIGN.md's, FlashAttention's): the wgmma kernel's max error on
out is at most 2x the larger of the mma kernel's and SDPA's (same dtype)
against the float64 reference; on lse at most 2x the mma kernel's, or 1e-4.

Everything printed also goes to $OUT/try_wgmma.txt when OUT is set. The
checks run in a worker process that a supervisor watches (run_script): a CUDA
error that leaves the context unusable (an illegal address, say) in one tile
shape's kernel, a crash of the process, or a check taking more than 40 s (a
hang) makes it run again in a fresh process without that tile shape
(--exclude), appending to the same log. Exit status: 0 all checks passed, 1 a
check failed (or a tile shape crashed), 2 could not run (no GPU, build
failed), 3 a hang or crash that could not be worked around, or the watchdog
(--deadline) stopped the run.
"""
import argparse
import math
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")

# (B, T, C, n_head): head dim 64 unless said.
SHAPES = [(2, 1, 768, 12), (2, 97, 768, 12), (2, 1025, 768, 12), (16, 1024, 768, 12),
          (4, 4096, 768, 12), (2, 1000, 1024, 8)]  # the last: head dim 128
QUICK_SHAPES = [(2, 1, 768, 12), (2, 97, 768, 12), (1, 300, 1024, 8)]
BENCH_SHAPES = [(16, 1024, 768, 12), (16, 1024, 2048, 16), (4, 4096, 768, 12),
                (4, 4096, 2048, 16)]  # head dims 64, 128, 64, 128
# Tile shapes built in attention_wgmma.cu: head dim -> [(key_tile, warpgroups,
# schedule)]. At head dim 64 the dispatch's default comes first, the serial
# default of sessions 5-8 second (the self-test breaks that one: it is built
# for both head dims); at 128 the dispatch's default is (64, 2, 0).
# Schedules: 0 serial, 1 pipelined, 2 producer (warpgroups counts the
# consumers; the block has one more).
SCHEDULES = ("serial", "pipelined", "producer")
TILES = {64: [(64, 2, 1), (64, 2, 0), (64, 2, 2), (64, 3, 2), (128, 2, 0), (128, 2, 1),
              (128, 1, 0), (128, 2, 2)],
         128: [(64, 2, 2), (64, 2, 0), (64, 2, 1), (128, 2, 0), (128, 2, 1)]}
TILE_CHECK_SHAPES = [(2, 97, 768, 12), (2, 1025, 768, 12), (16, 1024, 768, 12),
                     (3, 515, 1024, 8), (2, 1000, 1024, 8)]


class Log:
    """print() that also appends to $OUT/<name>, line by line (so a crash keeps it)."""

    def __init__(self, name="try_wgmma.txt"):
        self.name(name)
        self.stage = "start"

    def name(self, name):
        """Log to $OUT/name from now on (try_wgmma_backward.py, which shares this harness)."""
        out = os.environ.get("OUT")
        self.path = os.path.join(out, name) if out else None

    def start(self, append):
        if self.path:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            if not append:
                open(self.path, "w").close()

    def __call__(self, *parts):
        text = " ".join(str(p) for p in parts)
        print(text, flush=True)
        if self.path:
            with open(self.path, "a") as f:
                f.write(text + "\n")


log = Log()


def start_watchdog(seconds):
    """Ends the process (exit 3) if it runs past `seconds`: a hung kernel never returns."""
    started = time.time()

    def fire():
        log(f"TIMEOUT: still running after {time.time() - started:.0f} s, in stage: {log.stage}")
        os._exit(3)

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()


def environment(torch):
    log("torch", torch.__version__, "| cuda", torch.version.cuda, "| python", sys.version.split()[0])
    try:
        nvcc = subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout
        log("nvcc:", nvcc.strip().splitlines()[-1])
    except OSError as e:
        log("nvcc: not found:", e)
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        log(f"GPU: {p.name}, compute capability {p.major}.{p.minor}, {p.multi_processor_count} SMs")
    try:
        import triton
        log("triton", triton.__version__)
    except ImportError:
        log("triton: not installed (timing falls back to CUDA events)")


def build(verbose):
    from torch.utils import cpp_extension
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0a")
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 4))
    build_dir = os.path.join(os.environ.get("TMPDIR", "/tmp"), "nanoblock_try_wgmma")
    os.makedirs(build_dir, exist_ok=True)
    sources = [os.path.join(ROOT, "scripts", "wgmma_binding.cpp"),
               os.path.join(CSRC, "cuda", "attention_wgmma.cu"),
               os.path.join(CSRC, "cuda", "attention_wgmma_backward.cu"),
               os.path.join(CSRC, "cuda", "attention_mma.cu")]
    log.stage = "build"
    log(f"building {', '.join(os.path.relpath(s, ROOT) for s in sources)} in {build_dir} ...")
    t0 = time.time()
    # An explicit -gencode in the flags stops torch from adding its own arch
    # flags, so only sm_90a code is built. No --use_fast_math: exp2f as in the
    # mma kernel.
    ext = cpp_extension.load(
        name="nanoblock_try_wgmma",
        sources=sources,
        extra_include_paths=[CSRC],
        extra_cflags=["-O3"],
        extra_cuda_cflags=["-O3", "--expt-relaxed-constexpr", "-lineinfo",
                           "-gencode=arch=compute_90a,code=sm_90a", "-DNANOBLOCK_SM90A"],
        build_directory=build_dir,
        verbose=verbose)
    log(f"built in {time.time() - t0:.0f} s: {ext.__file__}")
    return ext


def kernel_resources(so_path, kernel_word="wgmma_forward", describe=None):
    """Registers, stack and HGMMA count of the kernels whose mangled name holds
    kernel_word (cuobjdump, when present); describe(name) names a kernel's tile shape
    (the forward's by default)."""
    try:
        usage = subprocess.run(["cuobjdump", "--dump-resource-usage", so_path],
                               capture_output=True, text=True, timeout=60).stdout
        sass = subprocess.run(["cuobjdump", "--dump-sass", so_path],
                              capture_output=True, text=True, timeout=120).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        log("cuobjdump unavailable:", e)
        return
    describe = describe or describe_forward_kernel
    name = None
    for line in usage.splitlines():
        m = re.search(r"Function (\S+):", line)
        if m:
            name = m.group(1)
            continue
        if name and kernel_word in name and "REG:" in line:
            dtype = "bf16" if "BFloat16" in name else "fp16"
            log(f"  {kernel_word} {dtype} ({describe(name)}): {line.strip()}")
            name = None
    arches = sorted(set(re.findall(r"arch = (sm_\w+)", sass)))
    log(f"  HGMMA instructions in the library: {sass.count('HGMMA')}; arches: {arches}")


def describe_forward_kernel(name):
    tiles = re.search(r"WgmmaTilesILi(\d+)ELi(\d+)ELi(\d+)ELi(\d+)ELi([012])E", name)
    if not tiles:
        return name
    hd, keys, wg, blocks, schedule = tiles.groups()
    return f"hd {hd} keys={keys} wg={wg} {SCHEDULES[int(schedule)]}, min blocks {blocks}"


def tiles_name(tiles):
    key_tile, warpgroups, schedule = tiles
    return f"keys={key_tile} wg={warpgroups} {SCHEDULES[schedule]}"


def kernel_name(kernel):
    """kernel: (head dim, key_tile, warpgroups, schedule), one compiled kernel (per dtype)."""
    return f"hd {kernel[0]} {tiles_name(kernel[1:])}"


def split_heads(qkv, n_head):
    """q, k, v of qkv [B, T, 3C] as [B, n_head, T, hd] views (as nanoGPT makes them)."""
    B, T, C3 = qkv.shape
    C = C3 // 3
    return [x.view(B, T, n_head, C // n_head).transpose(1, 2) for x in qkv.split(C, dim=2)]


def reference(torch, qkv, n_head):
    """float64 out [B, T, C] and lse [B, n_head, T] from the same (rounded) q, k, v."""
    q, k, v = (x.double() for x in split_heads(qkv, n_head))
    B, H, T, hd = q.shape
    mask = torch.ones(T, T, dtype=torch.bool, device=qkv.device).triu(1)
    out = torch.empty(B, H, T, hd, dtype=torch.float64, device=qkv.device)
    lse = torch.empty(B, H, T, dtype=torch.float64, device=qkv.device)
    for b in range(B):  # one batch at a time: [H, T, T] float64 is 1.6 GB at T = 4096
        s = (q[b] @ k[b].transpose(-1, -2)) * (1.0 / math.sqrt(hd))
        s.masked_fill_(mask, float("-inf"))
        lse[b] = torch.logsumexp(s, dim=-1)
        out[b] = torch.exp(s - lse[b][..., None]) @ v[b]
        del s
    return out.transpose(1, 2).reshape(B, T, H * hd), lse


def max_err(x, ref):
    """max |x - ref| (nan if x has a nan)."""
    d = (x.double() - ref).abs()
    return float("nan") if d.isnan().any() else d.max().item()


def describe_mismatch(torch, what, got, ref, tol, n_head, per_head_rows):
    """Where got differs from ref by more than tol: first (b, h, i, d), counts, patterns.

    per_head_rows: got/ref are [B, T, C] (out) when False, [B, H, T] (lse) when True."""
    if per_head_rows:
        err = (got.double() - ref).abs()  # [B, H, T]
    else:
        B, T, C = got.shape
        err = (got.double() - ref).abs().view(B, T, n_head, C // n_head).transpose(1, 2)
        got = got.view(B, T, n_head, C // n_head).transpose(1, 2)
        ref = ref.view(B, T, n_head, C // n_head).transpose(1, 2)
    bad = ~(err <= tol)  # nan counts as bad
    n_bad = int(bad.sum().item())
    if n_bad == 0:
        return
    first = bad.nonzero()[0].tolist()
    where = ", ".join(f"{k}={v}" for k, v in zip("bhid", first))
    log(f"    {what}: {n_bad} of {bad.numel()} off by more than {tol:.3g} "
        f"({int(got.isnan().sum().item())} nan); first at ({where}): "
        f"got {got[tuple(first)].item():.6g}, ref {ref[tuple(first)].item():.6g}")
    rows = bad.flatten(0, 1) if per_head_rows else bad.any(dim=3).flatten(0, 1)  # [B*H, T]
    bad_rows = rows.any(dim=0).nonzero().flatten().tolist()
    log(f"      rows i with a mismatch: {len(bad_rows)}, first {bad_rows[:12]}; "
        f"i % 64 seen: {sorted(set(i % 64 for i in bad_rows))[:24]}")
    if not per_head_rows:
        cols = bad.flatten(0, 2).any(dim=0).nonzero().flatten().tolist()
        heads = bad.transpose(0, 1).flatten(1).any(dim=1).nonzero().flatten().tolist()
        log(f"      head-dim columns d with a mismatch: {cols[:40]}; heads h: {heads}")


class Checks:
    def __init__(self, torch, ext, device="cuda", excluded=()):
        self.torch, self.ext, self.device = torch, ext, device
        self.excluded = set(excluded)  # kernels left out (they crashed before)
        self.failed = []
        self.fatal = None  # set after a CUDA error: the context is unusable then
        self.fatal_kernel = None  # the kernel that was running then
        try:
            import nanoblock  # noqa: F401  (the built package, if installed)
            self.op = torch.ops.nanoblock.causal_attention_forward
        except Exception:
            self.op = None

    def sync(self):
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def run(self, label, fn, kernel):
        """fn() inside a guard: an exception is a FAIL, a CUDA error stops the GPU work.

        kernel: (hd, key_tile, warpgroups, schedule) that fn runs (skipped when excluded)."""
        if self.fatal:
            return
        if kernel in self.excluded:
            log(f"skipped {label}: {kernel_name(kernel)} crashed in an earlier process")
            return
        mark_progress(kernel)
        try:
            fn()
            self.sync()
        except Exception as e:
            self.failed.append(label)
            log(f"FAIL {label}: {type(e).__name__}: {e}".rstrip())
            log("".join(traceback.format_exc(limit=4)).rstrip())
            self.check_context(label, kernel)
        mark_progress(None)

    def check_context(self, label, kernel):
        """After an exception: is the CUDA context still usable? If not, remember why."""
        try:
            self.sync()
            self.torch.zeros(1, device=self.device).add_(1).item()
        except Exception as e:
            self.fatal = f"{label}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
            self.fatal_kernel = kernel
            log(f"CUDA context unusable after {label}: stopping the GPU work in this process")

    def layout_probe(self, hd, tiles):
        """One-hot attention in float16 that makes every output an exact id of a v element.

        One head, T = 2048 / hd rows; q = k = 16 e_i (row i), so that S is 16^2 / sqrt(hd)
        on the diagonal and 0 elsewhere: the softmax is one-hot to float16 precision
        and out[i] must equal v[i]. v[j][d] = j * hd + d (exact in float16: < 2048).
        A wrong value names the (j, d) of v it came from: a wrong j points at the
        score / P path (S = Q K^T, the mask, the accumulator-to-A conversion), a wrong
        d with the right j at the V operand (its descriptor or swizzle)."""
        torch, ext = self.torch, self.ext
        name = f"layout probe hd {hd} {tiles_name(tiles)}"
        log.stage = name
        T, C = 2048 // hd, hd
        qkv = torch.zeros(1, T, 3 * C, dtype=torch.float16, device=self.device)
        eye = 16 * torch.eye(T, hd, device=self.device)
        ids = torch.arange(T * hd, device=self.device, dtype=torch.float32).view(T, hd)
        qkv[0, :, :C], qkv[0, :, C:2 * C], qkv[0, :, 2 * C:] = eye, eye, ids
        out, lse = ext.wgmma_forward_tiles(qkv, 1, *tiles)
        self.sync()
        got = out[0].float()
        lse_ref = 256 / math.sqrt(hd)
        bad = got != ids
        lse_bad = ~((lse[0, 0] - lse_ref).abs() < 1e-3)
        if not bad.any() and not lse_bad.any():
            log(f"PASS {name}: out[i] == v[i] exactly for all {T} rows, lse == {lse_ref:.4g}")
            return
        self.failed.append(name)
        log(f"FAIL {name}: {int(bad.sum())} of {bad.numel()} outputs wrong, "
            f"{int(lse_bad.sum())} of {T} lse wrong (lse[:4] = {lse[0, 0, :4].tolist()})")
        same_row = same_col = 0
        shown = 0
        for i, d in bad.nonzero().tolist():
            value = got[i, d].item()
            if value == value and value == round(value) and 0 <= value < T * hd:
                j, d2 = divmod(int(value), hd)
                same_row += j == i
                same_col += d2 == d
                where = f"v[j={j}][d={d2}]"
            else:
                where = "no element of v"
            if shown < 10:
                log(f"    out[i={i}][d={d}] = {value:g} = {where}")
                shown += 1
        log(f"    of the wrong ones: {same_row} hold their own row i of v (a V-operand "
            f"problem), {same_col} their own column d (a score / P problem)")

    def accuracy(self, dtype, shape, tiles=None, full=True):
        torch, ext = self.torch, self.ext
        F = torch.nn.functional
        B, T, C, H = shape
        hd = C // H
        name = f"{str(dtype).replace('torch.', '')} B={B} T={T} C={C} H={H} (hd {hd})"
        if tiles:
            name += " " + tiles_name(tiles)
        log.stage = "check " + name
        gen = torch.Generator(device=self.device).manual_seed(1234 + T)
        qkv = torch.randn(B, T, 3 * C, device=self.device, dtype=dtype, generator=gen)
        ref_out, ref_lse = reference(torch, qkv, H)

        t0 = time.time()
        if tiles:
            w_out, w_lse = ext.wgmma_forward_tiles(qkv, H, *tiles)
        else:
            w_out, w_lse = ext.wgmma_forward(qkv, H)
        self.sync()
        t_w = time.time() - t0
        m_out, m_lse = ext.mma_forward(qkv, H)
        self.sync()
        e_w, e_wl = max_err(w_out, ref_out), max_err(w_lse, ref_lse)
        e_m, e_ml = max_err(m_out, ref_out), max_err(m_lse, ref_lse)
        q, k, v = split_heads(qkv, H)
        with torch.no_grad():
            sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        e_s = max_err(sdpa.transpose(1, 2).reshape(B, T, C), ref_out)
        tol_out = max(2 * max(e_m, e_s), 1e-5)  # the floor: T = 1 is exact for all
        tol_lse = max(2 * e_ml, 1e-4)
        ok = e_w <= tol_out and e_wl <= tol_lse  # false for nan
        log(f"{'PASS' if ok else 'FAIL'} {name}: max|out - ref| wgmma {e_w:.3g} "
            f"(tol {tol_out:.3g}), mma {e_m:.3g}, sdpa {e_s:.3g}; max|lse - ref| wgmma "
            f"{e_wl:.3g} (tol {tol_lse:.3g}), mma {e_ml:.3g}; first call {t_w * 1e3:.1f} ms")
        if full:
            with torch.no_grad():
                sdpa32 = F.scaled_dot_product_attention(q.float(), k.float(), v.float(),
                                                        is_causal=True)
            e_s32 = max_err(sdpa32.transpose(1, 2).reshape(B, T, C), ref_out)
            line = (f"     sdpa float32 {e_s32:.3g}; max|wgmma - mma| out "
                    f"{max_err(w_out, m_out.double()):.3g}, lse {max_err(w_lse, m_lse.double()):.3g}")
            if self.op is not None:
                o_out, o_lse = self.op(qkv, H)
                line += (f"; nanoblock op vs ref: out {max_err(o_out, ref_out):.3g}, "
                         f"lse {max_err(o_lse, ref_lse):.3g}")
            log(line)
        if not ok:
            self.failed.append(name)
            describe_mismatch(torch, "out", w_out, ref_out, tol_out, H, per_head_rows=False)
            describe_mismatch(torch, "lse", w_lse, ref_lse, tol_lse, H, per_head_rows=True)


class FakeExtension:
    """Pure-PyTorch stand-in for the built extension, for --self-test (this script's
    own test, on the CPU). The tile shape `broken` swaps head-dim columns 0 and 1 of
    v and puts a nan in one output, so that the failure reports run too."""

    def __init__(self, torch, broken):
        self.torch, self.broken = torch, broken

    def wgmma_available(self):
        return True

    def attention(self, qkv, n_head):
        out, lse = reference(self.torch, qkv, n_head)
        return out.to(qkv.dtype), lse.float()

    def mma_forward(self, qkv, n_head):
        return self.attention(qkv, n_head)

    def wgmma_forward(self, qkv, n_head):
        return self.attention(qkv, n_head)

    def wgmma_forward_tiles(self, qkv, n_head, key_tile, warpgroups, schedule):
        if (key_tile, warpgroups, schedule) != self.broken:
            return self.attention(qkv, n_head)
        C = qkv.shape[2] // 3
        qkv = qkv.clone()
        v = qkv[..., 2 * C:]
        v[..., [0, 1]] = v[..., [1, 0]]
        out, lse = self.attention(qkv, n_head)
        out[0, -1, 5] = float("nan")
        return out, lse


def run_checks(checks, quick):
    """Serial tile shapes before pipelined and producer ones in each stage: a crash in one stops the
    process (and the rest runs again in a fresh one without it)."""
    torch = checks.torch
    log("\n== layout probes (float16, one-hot attention: out[i] must be v[i] exactly)")
    for hd, shapes in TILES.items():
        for tiles in sorted(shapes, key=lambda tiles: tiles[2]):
            checks.run(f"probe {hd} {tiles}", lambda: checks.layout_probe(hd, tiles),
                       (hd, *tiles))
    log("\n== accuracy, default tiles (vs float64 reference on the same q, k, v)")
    for dtype in (torch.bfloat16, torch.float16):
        for shape in (QUICK_SHAPES if quick else SHAPES):
            hd = shape[2] // shape[3]
            checks.run(f"{dtype} {shape}", lambda: checks.accuracy(dtype, shape),
                       (hd, *TILES[hd][0]))
    log("\n== accuracy, every tile shape built")
    for shape in TILE_CHECK_SHAPES[: 1 if quick else None]:
        hd = shape[2] // shape[3]
        for tiles in sorted(TILES[hd], key=lambda tiles: tiles[2]):
            for dtype in (torch.bfloat16,) if quick else (torch.bfloat16, torch.float16):
                checks.run(f"{dtype} {shape} {tiles}",
                           lambda: checks.accuracy(dtype, shape, tiles=tiles, full=False),
                           (hd, *tiles))


def self_test(torch):
    """The checks on the CPU against FakeExtension: every check of a good tile shape
    must pass and every check of the broken one fail."""
    broken = TILES[64][1]
    checks = Checks(torch, FakeExtension(torch, broken), device="cpu")
    run_checks(checks, quick=True)
    # The broken shape is built for both head dims: 2 probes and 1 quick accuracy check.
    expected = [label for label in checks.failed if tiles_name(broken) in label]
    log(f"\n== self-test: {len(checks.failed)} failed, {len(expected)} of them the broken "
        f"tile shape ({tiles_name(broken)}), expected 3 and 3")
    ok = len(expected) == 3 and len(checks.failed) == 3 and not checks.fatal
    log("SELF-TEST " + ("OK" if ok else "FAILED"))
    return 0 if ok else 1


def bench_ms(torch, fn):
    """Median milliseconds of fn() (triton's do_bench, else CUDA events)."""
    try:
        from triton.testing import do_bench
        try:
            return do_bench(fn, warmup=25, rep=200, return_mode="median")
        except TypeError:
            return do_bench(fn, warmup=25, rep=200)
    except ImportError:
        for _ in range(10):
            fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(50):
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return sorted(times)[len(times) // 2]


def timings(torch, ext, checks):
    F = torch.nn.functional
    from torch.nn.attention import SDPBackend, sdpa_kernel
    for B, T, C, H in BENCH_SHAPES:
        hd = C // H
        flops = 2 * B * H * T * T * hd  # causal forward: half of 4 B H T^2 hd
        log(f"\ntiming bf16 B={B} T={T} C={C} H={H} (hd {hd}); median of do_bench; "
            f"{flops / 1e9:.1f} GFLOP")
        qkv = torch.randn(B, T, 3 * C, device="cuda", dtype=torch.bfloat16)
        q, k, v = split_heads(qkv, H)
        cases = [(None, "mma.sync forward (ours)", lambda: ext.mma_forward(qkv, H)),
                 (None, "SDPA default",
                  lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))]
        for label, backend in (("SDPA cuDNN", SDPBackend.CUDNN_ATTENTION),
                               ("SDPA flash", SDPBackend.FLASH_ATTENTION)):
            def run(backend=backend):
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True)
            cases.append((None, label, run))
        cases += [((hd, *tiles), "wgmma " + tiles_name(tiles) + (" (default)" if i == 0 else ""),
                   lambda tiles=tiles: ext.wgmma_forward_tiles(qkv, H, *tiles))
                  for i, tiles in enumerate(TILES[hd]) if (hd, *tiles) not in checks.excluded]
        sdpa_ms = None
        for kernel, label, fn in cases:
            log.stage = f"timing {label} T={T}"
            if checks.fatal:
                return
            try:
                fn()
                torch.cuda.synchronize()
                ms = bench_ms(torch, fn)
            except Exception as e:
                log(f"  {label:44s} failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
                checks.check_context(f"timing {label} T={T}", kernel)
                continue
            if label == "SDPA default":
                sdpa_ms = ms
            log(f"  {label:44s} {ms * 1e3:8.1f} us  {flops / (ms * 1e-3) / 1e12:6.1f} TFLOP/s")
        if sdpa_ms:
            log(f"  (SDPA default: {sdpa_ms * 1e3:.1f} us)")


# The supervisor (run_script) and its worker process share a file naming the kernel
# whose check or timing the worker is in, and since when.
PROGRESS_ENV = "NANOBLOCK_TRY_WGMMA_PROGRESS"
progress_format = str  # the kernel as an --exclude argument (set by run_script)


def mark_progress(kernel):
    path = os.environ.get(PROGRESS_ENV)
    if path:
        with open(path, "w") as f:
            f.write("" if kernel is None else f"{time.time()} {progress_format(kernel)}")


def read_progress(path):
    """(kernel as an --exclude argument, since when) or (None, None)."""
    try:
        with open(path) as f:
            since, kernel = f.read().split(" ", 1)
        return kernel, float(since)
    except (OSError, ValueError):
        return None, None


def supervise(script, args, stall=40):
    """Runs the checks in a worker process (the script with --worker) and watches it: a
    worker killed by a signal (a crash), ended by its watchdog, or in one kernel's check
    for more than `stall` seconds (a hang: the worker is killed) runs again without that
    kernel, in a fresh process. A CUDA error the worker can catch it handles itself
    (run_script: it runs itself again). Exit status: the worker's."""
    t_start = time.time()
    excluded = list(args.exclude)
    progress = os.path.join(tempfile.mkdtemp(prefix="try_wgmma_"), "progress")
    while True:
        remaining = args.deadline - (time.time() - t_start)
        argv = [sys.executable, os.path.abspath(script.path), "--worker",
                "--deadline", f"{remaining:.0f}"]
        argv += ["--quick"] if args.quick else []
        argv += ["--verbose-build"] if args.verbose_build else []
        for kernel in excluded:
            argv += ["--exclude", kernel]
        mark = open(progress, "w")
        mark.close()
        worker = subprocess.Popen(argv, env=dict(os.environ, **{PROGRESS_ENV: progress}))
        stuck = False
        while worker.poll() is None:
            time.sleep(1)
            kernel, since = read_progress(progress)
            if kernel and time.time() - since > stall:
                stuck = True
                worker.kill()
                worker.wait()
        rc = worker.returncode
        if not stuck and rc in (0, 1, 2):
            return rc
        kernel, _ = read_progress(progress)
        why = (f"in one kernel's check for more than {stall} s (a hang?): killed" if stuck
               else f"ended by signal {-rc}" if rc < 0 else f"ended with exit status {rc}")
        log(f"\n== SUPERVISOR: the worker was {why}; it was in: {kernel or 'no kernel check'}")
        remaining = args.deadline - (time.time() - t_start)
        if not kernel or kernel in excluded or remaining < 45:
            log("== SUPERVISOR: not running again")
            return 3 if stuck or rc < 0 else rc
        excluded.append(kernel)
        log(f"== SUPERVISOR: running again in a fresh process without {kernel}\n")


def run_script(script):
    """The command line shared by try_wgmma.py and try_wgmma_backward.py. script (a
    namespace): doc, path, deadline (default seconds), exclude_metavar and
    exclude_example, parse_exclude(text) -> kernel, format_exclude(kernel) -> text,
    kernel_name(kernel), self_test(torch), make_checks(torch, ext, excluded),
    run_checks(checks, quick), timings(torch, ext, checks), resources(so_path)."""
    parser = argparse.ArgumentParser(description=script.doc.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes only, no timing")
    parser.add_argument("--build-only", action="store_true")
    parser.add_argument("--verbose-build", action="store_true")
    parser.add_argument("--self-test", action="store_true",
                        help="test this script: the checks on the CPU against a pure-PyTorch "
                             "stand-in for the kernels, one kernel broken on purpose")
    parser.add_argument("--deadline", type=float, default=script.deadline,
                        help="seconds before the watchdog ends the run (a hang)")
    parser.add_argument("--exclude", action="append", default=[], metavar=script.exclude_metavar,
                        help=f"leave a kernel out, e.g. {script.exclude_example} (given by the "
                             "script to itself after that kernel crashed)")
    parser.add_argument("--worker", action="store_true",
                        help="run the checks in this process (the default runs them in a "
                             "worker process that a supervisor watches for crashes and hangs)")
    args = parser.parse_args()
    global progress_format
    progress_format = script.format_exclude
    if not (args.worker or args.self_test or args.build_only):
        log.start(append=bool(args.exclude))
        return supervise(script, args)
    log.start(append=args.worker or bool(args.exclude))
    start_watchdog(args.deadline)
    t_start = time.time()
    import torch
    environment(torch)
    if args.self_test:
        return script.self_test(torch)
    if not torch.cuda.is_available() and not args.build_only:
        log("No CUDA GPU here: this script needs an H100 / H200 (sm_90a). "
            "(--build-only tries the build alone.)")
        return 2
    try:
        ext = build(args.verbose_build)
    except Exception as e:
        msg = str(e)
        log(f"BUILD FAILED: {type(e).__name__}: {msg[-8000:]}")
        return 2
    script.resources(ext.__file__)
    if args.build_only:
        return 0
    if not ext.wgmma_available():
        log("wgmma_available() is False: the GPU is not compute capability 9.0, or the "
            "build has no sm_90a code")
        return 2

    excluded = [script.parse_exclude(e) for e in args.exclude]
    checks = script.make_checks(torch, ext, excluded)
    script.run_checks(checks, args.quick)
    if not args.quick and not checks.fatal:
        script.timings(torch, ext, checks)

    log(f"\n== summary of this process ({time.time() - t_start:.0f} s)")
    if checks.failed:
        log(f"FAILED {len(checks.failed)}: " + "; ".join(checks.failed))
    if excluded:
        log("left out after crashing in an earlier process: "
            + "; ".join(script.kernel_name(k) for k in excluded))
    if checks.fatal:
        log("stopped early by a CUDA error:", checks.fatal)
        remaining = args.deadline - (time.time() - t_start)
        if checks.fatal_kernel and checks.fatal_kernel not in excluded and remaining > 45:
            bad = checks.fatal_kernel
            log(f"\n== running again in a fresh process without {script.kernel_name(bad)}\n")
            argv = [sys.executable, os.path.abspath(script.path)] + sys.argv[1:] + [
                "--exclude", script.format_exclude(bad), "--deadline", f"{remaining:.0f}"]
            sys.stdout.flush()
            os.execv(sys.executable, argv)
        return 1
    if checks.failed or excluded:
        return 1
    log("ALL PASS")
    return 0


def parse_exclude(text):
    hd, keys, wg, schedule = (int(x) for x in text.split(","))
    return (hd, keys, wg, schedule)


def main():
    return run_script(types.SimpleNamespace(
        doc=__doc__, path=__file__, deadline=540, exclude_metavar="HD,KEYS,WG,SCHEDULE",
        exclude_example="64,128,2,1", parse_exclude=parse_exclude,
        format_exclude=lambda kernel: ",".join(str(int(x)) for x in kernel),
        kernel_name=kernel_name, self_test=self_test,
        make_checks=lambda torch, ext, excluded: Checks(torch, ext, excluded=excluded),
        run_checks=run_checks, timings=timings, resources=kernel_resources))


if __name__ == "__main__":
    sys.exit(main())
