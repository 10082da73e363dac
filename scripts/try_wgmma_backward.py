#!/usr/bin/env python3
"""Build, check and time the wgmma attention backward prototype.

    python scripts/try_wgmma_backward.py              # build, check, time (H100 / H200)
    python scripts/try_wgmma_backward.py --quick      # small shapes, no timing
    python scripts/try_wgmma_backward.py --self-test  # this script's own test, on the CPU

Builds the same extension as try_wgmma.py (whose harness this script shares:
log, watchdog, build, reference helpers), then for bfloat16 and float16 over
T = 1, 17, 64, 1000, 1024, 4096 and head dims 64 and 128 compares dq, dk and
dv of every tile shape built (csrc/cuda/attention_wgmma_backward.cu: grad_kv
writes dk, dv; grad_q writes dq) with the float64 gradients of exact causal
attention on the same (rounded) q, k, v and grad_out. Both backward kernels,
ours (mma.sync) and wgmma, take the same inputs: out and lse of our mma.sync
forward and row_dot = rowsum(grad_out * out) in float32, as the op computes
them. Then times them against our mma.sync backward and SDPA's backward at
gpt2-small (B=16, T=1024, 12 heads of 64), at T=4096 and at head dim 128, and
the default pair as the op would run it (one after the other, and on two
streams).

Pass rule (DESIGN.md's, FlashAttention's): on each of dq, dk, dv, the wgmma
kernel's max error is at most 2x the larger of the mma kernel's and SDPA's
(same dtype, SDPA's own forward and backward) against the float64 reference
(floor 1e-5). Also required: every element the kernel owns written (the
output starts as nan) and two runs bitwise equal (determinism).

Everything printed also goes to $OUT/try_wgmma_backward.txt when OUT is set.
The checks run in a worker process that a supervisor watches (try_wgmma.py's
run_script): a CUDA error that leaves the context unusable in one kernel, a
crash of the process, or a kernel's check taking more than 40 s (a hang)
makes it run again in a fresh process without that kernel (--exclude),
appending to the same log. Exit status: 0 all checks passed, 1 a check failed
(or a kernel crashed), 2 could not run (no GPU, build failed), 3 a hang or
crash that could not be worked around, or the watchdog (--deadline) stopped
the run.
"""
import math
import os
import re
import sys
import time
import traceback
import types

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import try_wgmma as harness  # noqa: E402
from try_wgmma import bench_ms, log, max_err, split_heads  # noqa: E402

log.name("try_wgmma_backward.txt")

# (B, T, C, n_head): head dim 64 (C = 768) or 128 (C = 1024).
SHAPES = [(2, 1, 768, 12), (2, 17, 768, 12), (2, 64, 768, 12), (2, 1000, 768, 12),
          (16, 1024, 768, 12), (4, 4096, 768, 12),
          (2, 1, 1024, 8), (2, 17, 1024, 8), (2, 64, 1024, 8), (2, 1000, 1024, 8),
          (2, 1024, 1024, 8), (1, 4096, 1024, 8)]
QUICK_SHAPES = [(2, 1, 768, 12), (2, 17, 768, 12), (1, 200, 768, 12), (1, 130, 1024, 8)]
BENCH_SHAPES = [(16, 1024, 768, 12), (4, 4096, 768, 12), (8, 1024, 1024, 8)]
# Tile shapes built in attention_wgmma_backward.cu, the default first:
# grad_kv: head dim -> [(query_tile, warpgroups, schedule)]; grad_q: [(key_tile,
# warpgroups, schedule)]. Schedules: 0 serial, 1 overlap (grad_kv), 2 pipelined.
KERNELS = {"kv": {64: [(128, 2, 0), (128, 2, 1), (64, 2, 0), (64, 2, 2), (64, 1, 0)],
                  128: [(64, 2, 1), (64, 2, 0), (64, 1, 0)]},
           "q": {64: [(64, 1, 0), (64, 1, 2), (128, 2, 0), (128, 2, 2), (128, 1, 0),
                      (64, 2, 0)],
                 128: [(64, 2, 0), (64, 2, 2), (64, 1, 0)]}}
SCHEDULES = ("", " overlap", " pipelined")
PARTS = {"kv": ("dk", "dv"), "q": ("dq",)}
COLUMNS = {"dq": 0, "dk": 1, "dv": 2}  # which C-wide block of grad_qkv


def kernel_name(kernel):
    """kernel: (which, hd, tile, warpgroups, schedule); which is 'kv' or 'q'."""
    which, hd, tile, wg, schedule = kernel
    tile_kind = "query" if which == "kv" else "key"
    return f"grad_{which} hd {hd} {tile_kind} tile {tile} wg={wg}{SCHEDULES[schedule]}"


def launch(ext, kernel, grad_out, qkv, lse, dot, n_head, grads):
    """Runs one kernel (which, hd, tile, warpgroups, schedule), writing its columns of grads."""
    which, _, tile, wg, schedule = kernel
    if which == "kv":
        ext.wgmma_grad_kv(grad_out, qkv, lse, dot, n_head, grads, tile, wg, schedule)
    else:
        ext.wgmma_grad_q(grad_out, qkv, lse, dot, n_head, grads, tile, wg, schedule)


def kernels_of(hd):
    return [(which, hd, *tiles) for which in ("kv", "q") for tiles in KERNELS[which][hd]]


def reference_grads(torch, qkv, grad_out, n_head):
    """float64 grad_qkv [B, T, 3C] of exact causal attention on the same q, k, v, grad_out."""
    q, k, v = (x.double() for x in split_heads(qkv, n_head))
    B, H, T, hd = q.shape
    C = H * hd
    dout = grad_out.double().view(B, T, H, hd).transpose(1, 2)
    scale = 1.0 / math.sqrt(hd)
    mask = torch.ones(T, T, dtype=torch.bool, device=qkv.device).triu(1)
    grads = torch.empty(B, T, 3 * C, dtype=torch.float64, device=qkv.device)
    for b in range(B):  # one batch at a time: [H, T, T] float64 is 1.6 GB at T = 4096
        s = (q[b] @ k[b].transpose(-1, -2)) * scale
        s.masked_fill_(mask, float("-inf"))
        p = torch.softmax(s, dim=-1)
        del s
        o = p @ v[b]
        dv = p.transpose(-1, -2) @ dout[b]
        dp = dout[b] @ v[b].transpose(-1, -2)
        d = (dout[b] * o).sum(-1, keepdim=True)
        ds = p * (dp - d)
        del p, dp
        dq = (ds @ k[b]) * scale
        dk = (ds.transpose(-1, -2) @ q[b]) * scale
        del ds
        for i, g in enumerate((dq, dk, dv)):
            grads[b, :, i * C:(i + 1) * C] = g.transpose(0, 1).reshape(T, C)
    return grads


def row_dot(torch, grad_out, out, n_head):
    """D = rowsum(grad_out * out) per head, [B, n_head, T] float32 (as the op computes it)."""
    B, T, C = out.shape
    prod = grad_out.float() * out.float()
    return prod.view(B, T, n_head, C // n_head).sum(-1).transpose(1, 2).contiguous()


def part(grads, name):
    C = grads.shape[2] // 3
    i = COLUMNS[name]
    return grads[..., i * C:(i + 1) * C]


class Checks(harness.Checks):
    """try_wgmma.Checks' guard (run, check_context: a CUDA error stops the GPU work)
    with the backward's checks; kernels are (which, hd, tile, warpgroups)."""

    def run(self, label, fn, kernel):
        if not self.fatal and kernel in self.excluded:
            log(f"skipped {label}: {kernel_name(kernel)} crashed in an earlier process")
            return
        super().run(label, fn, kernel)

    def wgmma(self, kernel, grad_out, qkv, lse, dot, n_head):
        """grad_qkv with only the kernel's columns written (the rest nan)."""
        grads = self.torch.full_like(qkv, float("nan"))
        launch(self.ext, kernel, grad_out, qkv, lse, dot, n_head, grads)
        return grads

    def one_hot_probe(self, kernel):
        """Exact answers from one-hot attention in float16, head dim hd, T = hd rows:
        q = k = 16 e_i (P = identity to float16 precision: lse given as 16^2 scale),
        v = 0 (so dP = 0) and row_dot = -1 / scale (so dS = identity); grad_out[i][d] =
        (i % R) * hd + d with R = 2048 / hd (exact in float16: < 2048). Then dv =
        grad_out, dk = q and dq = k exactly. A wrong dv names the (i mod R, d) of
        grad_out it came from: a wrong i points at P^T (the scores, the mask, the
        accumulator-to-A conversion), a wrong d with the right i at the MN-major B
        operand (its descriptor or swizzle)."""
        torch = self.torch
        which, hd = kernel[:2]
        name = f"one-hot probe {kernel_name(kernel)}"
        log.stage = name
        T = C = hd
        scale = 1.0 / math.sqrt(hd)
        qkv = torch.zeros(1, T, 3 * C, dtype=torch.float16, device=self.device)
        eye = 16 * torch.eye(T, hd, device=self.device)
        qkv[0, :, :C], qkv[0, :, C:2 * C] = eye, eye
        R = 2048 // hd
        ids = torch.arange(T * hd, device=self.device, dtype=torch.float32).view(1, T, hd)
        ids = ids.remainder(R * hd)
        grad_out = ids.to(torch.float16)
        lse = torch.full((1, 1, T), 256 * scale, device=self.device)
        dot = torch.full((1, 1, T), -1 / scale, device=self.device)
        grads = self.wgmma(kernel, grad_out, qkv, lse, dot, 1)
        self.sync()
        expected = {"dq": eye, "dk": eye, "dv": ids[0]}
        wrong = []
        for p in PARTS[which]:
            got = part(grads, p)[0].float()
            bad = ~(got == expected[p])
            if bad.any():
                wrong.append(p)
                log(f"FAIL {name}: {p}: {int(bad.sum())} of {bad.numel()} wrong")
                for i, d in bad.nonzero().tolist()[:8]:
                    value = got[i, d].item()
                    where = ""
                    if p == "dv" and value == value and value == round(value) and 0 <= value < R * hd:
                        where = " = grad_out[i = {} mod {}][d={}]".format(
                            *divmod(int(value), hd)[:1], R, int(value) % hd)
                    log(f"    {p}[i={i}][d={d}] = {value:g}{where}, expected "
                        f"{expected[p][i, d].item():g}")
        if wrong:
            self.failed.append(name)
        else:
            log(f"PASS {name}: {', '.join(PARTS[which])} exact for all {T} rows")

    def prepare(self, dtype, shape):
        """Inputs, the float64 reference, SDPA's and the mma kernel's gradients."""
        torch = self.torch
        F = torch.nn.functional
        B, T, C, H = shape
        gen = torch.Generator(device=self.device).manual_seed(4321 + T)
        qkv = torch.randn(B, T, 3 * C, device=self.device, dtype=dtype, generator=gen)
        grad_out = torch.randn(B, T, C, device=self.device, dtype=dtype, generator=gen)
        ref = reference_grads(torch, qkv, grad_out, H)
        out, lse = self.ext.mma_forward(qkv, H)
        dot = row_dot(torch, grad_out, out, H)
        mma = self.ext.mma_backward(grad_out, qkv, lse, dot, H)
        q, k, v = (x.detach().requires_grad_() for x in split_heads(qkv, H))
        sdpa_out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        dq, dk, dv = torch.autograd.grad(
            sdpa_out, (q, k, v), grad_out.view(B, T, H, C // H).transpose(1, 2))
        sdpa = torch.cat([g.transpose(1, 2).reshape(B, T, C) for g in (dq, dk, dv)], dim=2)
        self.sync()
        return dict(qkv=qkv, grad_out=grad_out, ref=ref, lse=lse, dot=dot, mma=mma, sdpa=sdpa)

    def accuracy(self, dtype, shape, kernel, data):
        torch = self.torch
        B, T, C, H = shape
        name = (f"{str(dtype).replace('torch.', '')} B={B} T={T} C={C} H={H} "
                f"{kernel_name(kernel)}")
        log.stage = "check " + name
        args = (data["grad_out"], data["qkv"], data["lse"], data["dot"], H)
        t0 = time.time()
        got = self.wgmma(kernel, *args)
        self.sync()
        t_first = time.time() - t0
        again = self.wgmma(kernel, *args)
        self.sync()
        ok = True
        words = []
        for p in PARTS[kernel[0]]:
            ref = part(data["ref"], p)
            e_w = max_err(part(got, p), ref)
            e_m = max_err(part(data["mma"], p), ref)
            e_s = max_err(part(data["sdpa"], p), ref)
            tol = max(2 * max(e_m, e_s), 1e-5)
            same = torch.equal(part(got, p), part(again, p))  # false when a nan is there
            ok = ok and e_w <= tol and same
            words.append(f"{p} wgmma {e_w:.3g} (tol {tol:.3g}) mma {e_m:.3g} sdpa {e_s:.3g}"
                         f"{'' if same else ' NOT BITWISE REPEATABLE'}")
        log(f"{'PASS' if ok else 'FAIL'} {name}: max|x - ref| " + "; ".join(words)
            + f"; first call {t_first * 1e3:.1f} ms")
        if not ok:
            self.failed.append(name)
            for p in PARTS[kernel[0]]:
                ref = part(data["ref"], p)
                tol = max(2 * max(max_err(part(data["mma"], p), ref),
                                  max_err(part(data["sdpa"], p), ref)), 1e-5)
                harness.describe_mismatch(torch, p, part(got, p), ref, tol, H,
                                          per_head_rows=False)


class FakeExtension:
    """Pure-PyTorch stand-in for the built extension, for --self-test (on the CPU).
    The kernel `broken` (which, hd, tile, warpgroups) swaps head-dim columns 0 and 1 of
    its first gradient and leaves one element unwritten (nan), so that the failure
    reports run too."""

    def __init__(self, torch, broken):
        self.torch, self.broken = torch, broken

    def mma_forward(self, qkv, n_head):
        out, lse = harness.reference(self.torch, qkv, n_head)
        return out.to(qkv.dtype), lse.float()

    def _grads(self, grad_out, qkv, lse, dot, n_head):
        # The float64 reference, except that lse and row_dot come from the inputs (as
        # in the kernels), so that the one-hot probe's given lse and row_dot count.
        torch = self.torch
        q, k, v = (x.double() for x in split_heads(qkv, n_head))
        B, H, T, hd = q.shape
        dout = grad_out.double().view(B, T, H, hd).transpose(1, 2)
        scale = 1.0 / math.sqrt(hd)
        s = (q @ k.transpose(-1, -2)) * scale
        s.masked_fill_(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        p = torch.exp(s - lse.double()[..., None])
        ds = p * (dout @ v.transpose(-1, -2) - dot.double()[..., None]) * scale
        # P and dS rounded to 16 bits before their products, as in the kernels
        p, ds = p.to(qkv.dtype).double(), ds.to(qkv.dtype).double()
        gs = (ds @ k, ds.transpose(-1, -2) @ q, p.transpose(-1, -2) @ dout)
        return torch.cat([g.transpose(1, 2).reshape(B, T, H * hd) for g in gs], dim=2)

    def mma_backward(self, grad_out, qkv, lse, dot, n_head):
        return self._grads(grad_out, qkv, lse, dot, n_head).to(qkv.dtype)

    def _write(self, which, grad_out, qkv, lse, dot, n_head, grads, tile, wg, schedule=0):
        full = self._grads(grad_out, qkv, lse, dot, n_head).to(qkv.dtype)
        hd = qkv.shape[2] // 3 // n_head
        for p in PARTS[which]:
            part(grads, p).copy_(part(full, p))
        if (which, hd, tile, wg, schedule) == self.broken:
            first = part(grads, PARTS[which][0])
            first[..., [0, 1]] = first[..., [1, 0]].clone()
            first[0, -1, 5] = float("nan")

    def wgmma_grad_kv(self, *args):
        self._write("kv", *args)

    def wgmma_grad_q(self, *args):
        self._write("q", *args)


def run_checks(checks, quick):
    torch = checks.torch
    log("\n== one-hot probes (float16: dv == grad_out, dk == q, dq == k exactly)")
    for hd in (64, 128):
        for kernel in kernels_of(hd):
            checks.run(f"probe {kernel_name(kernel)}", lambda: checks.one_hot_probe(kernel),
                       kernel)
    log("\n== accuracy of every kernel built (vs float64 gradients on the same inputs)")
    for dtype in (torch.bfloat16, torch.float16):
        for shape in (QUICK_SHAPES if quick else SHAPES):
            if checks.fatal:
                return
            hd = shape[2] // shape[3]
            log.stage = f"reference {dtype} {shape}"
            try:
                data = checks.prepare(dtype, shape)
            except Exception as e:
                checks.failed.append(f"reference {dtype} {shape}")
                log(f"FAIL reference {dtype} {shape}: {type(e).__name__}: {e}")
                log("".join(traceback.format_exc(limit=4)).rstrip())
                checks.check_context(f"reference {dtype} {shape}", None)
                continue
            for kernel in kernels_of(hd):
                checks.run(f"{dtype} {shape} {kernel_name(kernel)}",
                           lambda: checks.accuracy(dtype, shape, kernel, data), kernel)
            del data


def self_test(torch):
    """The checks on the CPU against FakeExtension: every check of a good kernel must
    pass and every check of the broken one fail."""
    broken = ("kv", 64, 64, 2, 0)
    checks = Checks(torch, FakeExtension(torch, broken), device="cpu")
    run_checks(checks, quick=True)
    expected = [label for label in checks.failed if kernel_name(broken) in label]
    # the broken kernel: 1 probe, and 2 dtypes x 3 quick shapes of head dim 64
    log(f"\n== self-test: {len(checks.failed)} failed, {len(expected)} of them the broken "
        f"kernel ({kernel_name(broken)}), expected 7 and 7")
    ok = len(expected) == 7 and len(checks.failed) == 7 and not checks.fatal
    log("SELF-TEST " + ("OK" if ok else "FAILED"))
    return 0 if ok else 1


def kernel_times(torch, fn, iters=20):
    """{kernel name: mean device microseconds per call of fn} from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    times = {}
    for evt in prof.key_averages():
        if "CUDA" not in str(getattr(evt, "device_type", "")):
            continue  # host-side ops: their device time is their kernels', counted below
        total = getattr(evt, "device_time_total", None)
        if total is None:
            total = getattr(evt, "cuda_time_total", 0)
        if total > 0:
            times[evt.key] = total / iters
    return times


def short(name, width=60):
    return name if len(name) <= width else name[:width - 3] + "..."


def timings(torch, ext, checks):
    F = torch.nn.functional
    from torch.nn.attention import SDPBackend, sdpa_kernel
    for B, T, C, H in BENCH_SHAPES:
        hd = C // H
        flops = 5 * B * H * T * T * hd  # causal backward: half of 5 products of 2 B H T^2 hd
        log(f"\ntiming bf16 B={B} T={T} C={C} H={H} (hd {hd}); median of do_bench; "
            f"{flops / 1e9:.1f} GFLOP (5 causal products)")
        qkv = torch.randn(B, T, 3 * C, device=checks.device, dtype=torch.bfloat16)
        grad_out = torch.randn(B, T, C, device=checks.device, dtype=torch.bfloat16)
        out, lse = ext.mma_forward(qkv, H)
        dot = row_dot(torch, grad_out, out, H)
        grads = torch.empty_like(qkv)
        q, k, v = (x.detach().requires_grad_() for x in split_heads(qkv, H))
        dout = grad_out.view(B, T, H, hd).transpose(1, 2)
        cases = [(None, "mma.sync backward (ours: grad_kv + grad_q)",
                  lambda: ext.mma_backward(grad_out, qkv, lse, dot, H))]
        for label, backend in (("SDPA default", None), ("SDPA cuDNN", SDPBackend.CUDNN_ATTENTION),
                               ("SDPA flash", SDPBackend.FLASH_ATTENTION)):
            def forward(backend=backend):
                if backend is None:
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True)
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True)
            try:
                o = forward()
                cases.append((None, label + " backward",
                              lambda o=o: torch.autograd.grad(o, (q, k, v), dout,
                                                              retain_graph=True)))
            except Exception as e:
                log(f"  {label} forward failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
        for which in ("kv", "q"):
            for i, tiles in enumerate(KERNELS[which][hd]):
                kernel = (which, hd, *tiles)
                if kernel in checks.excluded:
                    continue
                cases.append((kernel, "wgmma " + kernel_name(kernel) + (" (default)" if i == 0 else ""),
                              lambda kernel=kernel: launch(ext, kernel, grad_out, qkv, lse, dot, H,
                                                           grads)))
        defaults = [(which, hd, *KERNELS[which][hd][0]) for which in ("kv", "q")]
        if not any(kernel in checks.excluded for kernel in defaults):
            # The whole backward as the op would run it: the default grad_kv and grad_q
            # one after the other, and on two streams at once (they only share inputs).
            def serial():
                for kernel in defaults:
                    launch(ext, kernel, grad_out, qkv, lse, dot, H, grads)
            streams = [torch.cuda.Stream(), torch.cuda.Stream()]

            def concurrent():
                current = torch.cuda.current_stream()
                for stream, kernel in zip(streams, defaults):
                    stream.wait_stream(current)
                    with torch.cuda.stream(stream):
                        launch(ext, kernel, grad_out, qkv, lse, dot, H, grads)
                for stream in streams:
                    current.wait_stream(stream)
            cases.append((defaults[0], "wgmma defaults, grad_kv then grad_q", serial))
            cases.append((defaults[0], "wgmma defaults, grad_kv and grad_q on 2 streams",
                          concurrent))
        results = {}
        for kernel, label, fn in cases:
            log.stage = f"timing {label} T={T}"
            if checks.fatal:
                return
            harness.mark_progress(kernel)
            try:
                fn()
                torch.cuda.synchronize()
                ms = bench_ms(torch, fn)
            except Exception as e:
                log(f"  {label:52s} failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
                checks.check_context(f"timing {label} T={T}", kernel)
                continue
            finally:
                harness.mark_progress(None)
            results[label] = ms
            log(f"  {label:52s} {ms * 1e3:8.1f} us")
        best = {w: min((ms for label, ms in results.items()
                        if f"grad_{w} " in label and "defaults" not in label), default=None)
                for w in ("kv", "q")}
        if best["kv"] and best["q"]:
            log(f"  best wgmma grad_kv + best wgmma grad_q: {(best['kv'] + best['q']) * 1e3:.1f} us "
                f"({flops / ((best['kv'] + best['q']) * 1e-3) / 1e12:.1f} TFLOP/s); row_dot "
                f"(rowsum(dO * O)) is outside every figure but SDPA's")
        # Per-kernel device times of the composite cases (which kernels each one runs).
        for label, fn in ((c[1], c[2]) for c in cases if c[0] is None and c[1] in results):
            log.stage = f"profile {label} T={T}"
            try:
                times = kernel_times(torch, fn)
            except Exception as e:
                log(f"  profile of {label} failed: {type(e).__name__}: {str(e)[:200]}")
                checks.check_context(f"profile {label}", None)
                if checks.fatal:
                    return
                continue
            top = sorted(times.items(), key=lambda kv: -kv[1])[:5]
            log(f"  kernels of {label}: " + "; ".join(f"{short(n)} {t:.1f} us" for n, t in top))


def describe_kernel(name):
    tiles = re.search(r"Grad(Kv|Q)TilesILi(\d+)ELi(\d+)ELi(\d+)ELi(\d+)E(Li(\d)E)?", name)
    if not tiles:
        return name
    which, hd, tile, wg, blocks, _, schedule = tiles.groups()
    kernel = ("kv" if which == "Kv" else "q", int(hd), int(tile), int(wg), int(schedule or 0))
    return f"{kernel_name(kernel)}, min blocks {blocks}"


def parse_exclude(text):
    which, hd, tile, wg, schedule = text.split(",")
    return (which, int(hd), int(tile), int(wg), int(schedule))


def main():
    return harness.run_script(types.SimpleNamespace(
        doc=__doc__, path=__file__, deadline=230, exclude_metavar="WHICH,HD,TILE,WG,SCHEDULE",
        exclude_example="kv,64,128,2,0", parse_exclude=parse_exclude,
        format_exclude=lambda kernel: ",".join(str(x) for x in kernel),
        kernel_name=kernel_name, self_test=self_test,
        make_checks=lambda torch, ext, excluded: Checks(torch, ext, excluded=excluded),
        run_checks=run_checks, timings=timings,
        resources=lambda so_path: harness.kernel_resources(so_path, "wgmma_grad",
                                                           describe_kernel)))


if __name__ == "__main__":
    sys.exit(main())
