#!/usr/bin/env python3
"""A model, in Python, of the index arithmetic of the wgmma backward kernels
(csrc/cuda/attention_wgmma_backward.cu), run on the CPU (no GPU needed):

1. Shared-memory addresses. For every wgmma the kernels issue (S^T = K Q^T,
   dP^T = V dO^T, dV += P^T dO, dK += dS^T Q in grad_kv; S = Q K^T, dP = dO V^T,
   dQ += dS K in grad_q), every element the tensor cores read through the
   descriptor (PTX ISA, "Shared Memory Matrix Layout", canonical layouts
   K-major and MN-major with the 128-byte swizzle applied to the absolute
   address) must be the byte where copy_tile_async stored that element of
   the logical operand.
2. Loop bounds, masks, layouts. The kernels' blocks, warpgroups, loop bounds
   (which query / key tiles a warpgroup multiplies, which take the mask),
   their per-thread index expressions (copied from the kernel) for the
   accumulator layout, lse / D lookups, the mask and the stores, evaluated in
   float64 with numpy over all threads at once, must give the exact gradients
   (to 1e-9) for T across tile boundaries, every element owned once.

    python scripts/model_wgmma_backward.py
"""
import math
import sys

import numpy as np

ROW_BYTES, ATOM = 128, 1024
# (BQ, WG); the schedules (serial, overlap, pipelined) share addresses, loops and
# indices (pipelined: 3 buffers instead of 2).
GRAD_KV = {64: [(64, 2), (128, 2), (64, 1), (128, 1)], 128: [(64, 2), (64, 1)]}
GRAD_Q = {64: [(64, 2), (128, 2), (64, 1), (128, 1)], 128: [(64, 2), (64, 1)]}  # (BK, WG)


# ---------------------------------------------------------------------------
# 1. Addresses.

def swizzle(addr):
    return addr ^ (((addr >> 7) & 7) << 4)


def stored_at(tile, rows, r, c):
    """copy_tile_async: byte of element (row r, column c) of a tile of `rows` rows."""
    chunk = c // 8
    panel, cc = chunk // 8, chunk % 8
    return tile + panel * rows * ROW_BYTES + r * ROW_BYTES + ((cc ^ (r % 8)) << 4) + (c % 8) * 2


def k_major_read(start, sbo, mn, k):
    """Canonical K-major 128B layout ((8,m),(T,2k)):((8T,SBO),(1,T)), 16-bit elements:
    byte of element (mn, k), k < 16 (one instruction)."""
    return swizzle(start + (mn % 8) * ROW_BYTES + (mn // 8) * sbo + k * 2)


def mn_major_read(start, lbo, sbo, k, n):
    """Canonical MN-major 128B layout ((T,8,m),(8,k)):((1,T,LBO),(8T,SBO)): byte of
    element (k, n), k < 16."""
    n0, n1, n2 = n % 8, (n // 8) % 8, n // 64
    return swizzle(start + n0 * 2 + n1 * 16 + n2 * lbo + (k % 8) * ROW_BYTES + (k // 8) * sbo)


def check_scores(a_tile, a_rows, a_row0, b_tile, b_rows, n, hd):
    """issue_scores<HD, A_ROWS, N>(acc, a_tile + a_row0 rows, b_tile): D[m][n] = sum_k A[m][k] B[n][k]."""
    bad = 0
    a_base = a_tile + a_row0 * ROW_BYTES
    for ks in range(hd // 16):
        panel, in_row = ks // 4, (ks % 4) * 32
        a_start = a_base + panel * a_rows * ROW_BYTES + in_row
        b_start = b_tile + panel * b_rows * ROW_BYTES + in_row
        for k in range(16):
            col = ks * 16 + k
            for m in range(64):
                bad += k_major_read(a_start, ATOM, m, k) != stored_at(a_tile, a_rows, a_row0 + m, col)
            for nn in range(n):
                bad += k_major_read(b_start, ATOM, nn, k) != stored_at(b_tile, b_rows, nn, col)
    return bad


def check_values(b_tile, b_rows, hd):
    """issue_values<HD, K_ROWS>(acc, frags, b_tile): D[m][n] += sum_k A[m][k] B[k][n], B a
    tile of b_rows rows reduced over its rows (MN-major, LBO = b_rows * 128, SBO = 1024)."""
    bad = 0
    for kk in range(b_rows // 16):
        start = b_tile + kk * 16 * ROW_BYTES
        for k in range(16):
            for nn in range(hd):
                bad += (mn_major_read(start, b_rows * ROW_BYTES, ATOM, k, nn)
                        != stored_at(b_tile, b_rows, kk * 16 + k, nn))
    return bad


def check_negative_controls():
    """The address check must see a wrong panel stride, a wrong LBO and an unswizzled copy
    (tiles of 128 rows, head dim 128)."""
    base = 3 * ATOM
    panel = sum(k_major_read(base + 64 * ROW_BYTES, ATOM, m, k) != stored_at(base, 128, m, 64 + k)
                for m in range(64) for k in range(16))  # panel stride of a 64-row tile
    lbo = sum(mn_major_read(base, 64 * ROW_BYTES, ATOM, k, n) != stored_at(base, 128, k, n)
              for k in range(16) for n in range(128))  # LBO of a 64-row tile
    unswizzled = sum(k_major_read(base, ATOM, m, k) != base + m * ROW_BYTES + 2 * k
                     for m in range(64) for k in range(16))
    return panel > 0 and lbo > 0 and unswizzled > 0


def check_addresses():
    assert check_negative_controls(), "the address check misses deliberate errors"
    total_bad = 0
    base = 3 * ATOM  # any 1024-aligned start
    for hd, shapes in GRAD_KV.items():
        for bq, wg in shapes:
            bk = 64 * wg
            kv = bk * hd * 2
            k_s, v_s = base, base + kv
            q_s = v_s + kv
            do_s = q_s + 3 * bq * hd * 2  # 3 buffers (pipelined; the others use 2)
            bad = 0
            for buf in range(3):
                qb, dob = q_s + buf * bq * hd * 2, do_s + buf * bq * hd * 2
                for w in range(wg):
                    bad += check_scores(k_s, bk, 64 * w, qb, bq, bq, hd)  # S^T = K Q^T
                    bad += check_scores(v_s, bk, 64 * w, dob, bq, bq, hd)  # dP^T = V dO^T
                    bad += check_values(dob, bq, hd) + check_values(qb, bq, hd)  # dV, dK
            total_bad += bad
            print(f"grad_kv hd {hd} BQ {bq} WG {wg}: address mismatches {bad}")
    for hd, shapes in GRAD_Q.items():
        for bk, wg in shapes:
            bq = 64 * wg
            q_s = base
            do_s = q_s + bq * hd * 2
            k_s = do_s + bq * hd * 2
            v_s = k_s + 3 * bk * hd * 2  # 3 buffers (pipelined; serial uses 2)
            bad = 0
            for buf in range(3):
                kb, vb = k_s + buf * bk * hd * 2, v_s + buf * bk * hd * 2
                for w in range(wg):
                    bad += check_scores(q_s, bq, 64 * w, kb, bk, bk, hd)  # S = Q K^T
                    bad += check_scores(do_s, bq, 64 * w, vb, bk, bk, hd)  # dP = dO V^T
                    bad += check_values(kb, bk, hd)  # dQ += dS K
            total_bad += bad
            print(f"grad_q hd {hd} BK {bk} WG {wg}: address mismatches {bad}")
    return total_bad


# ---------------------------------------------------------------------------
# 2. Loops, masks and layouts, over all threads at once.

def pad(x, rows, first):
    """Rows first .. first + rows - 1 of x, zeros past its end (copy_tile_async's zero fill)."""
    return np.vstack([x, np.zeros((rows + first + 256, x.shape[1]))])[first:first + rows]


def thread_grid(n_cols):
    """Arrays over (warp, lane, j, e) of a warpgroup for an accumulator of n_cols columns."""
    w, lane, j, e = np.meshgrid(np.arange(4), np.arange(32), np.arange(n_cols // 8), np.arange(4),
                                indexing="ij")
    return w, lane, j, e


def layout_b(w, lane, j, e):
    """wgmma.cuh layout (b): accumulator element d[4j + e] of thread (w, lane) is
    D[16w + g + 8 (e / 2)][8j + 2t + e % 2]."""
    g, t = lane // 4, lane % 4
    return 16 * w + g + 8 * (e // 2), 8 * j + 2 * t + e % 2


def emulate_grad_kv(q, k, v, do, lse, dot, hd, BQ, WG, scale):
    T = q.shape[0]
    BK = 64 * WG
    scale_log2 = scale * math.log2(math.e)
    dk = np.full((T, hd), np.nan)
    dv = np.full((T, hd), np.nan)
    written = np.zeros(T, dtype=int)
    key_tiles = (T + BK - 1) // BK
    query_tiles = (T + BQ - 1) // BQ
    lse_pad = np.concatenate([lse, np.zeros(BQ + 256)])
    dot_pad = np.concatenate([dot, np.zeros(BQ + 256)])
    w, lane, j, e = thread_grid(BQ)
    for kt in range(key_tiles):
        k0 = kt * BK
        first_tile = k0 // BQ
        k_tile, v_tile = pad(k, BK, k0), pad(v, BK, k0)  # zeros past T
        for wg in range(WG):
            wg_k0 = k0 + 64 * wg
            key = wg_k0 + 16 * w + lane // 4  # as in the kernel
            my_first = query_tiles if wg_k0 >= T else wg_k0 // BQ
            diag_end = min(query_tiles, max(my_first, (wg_k0 + 64 - 1 + BQ - 1) // BQ))
            full_end = max(diag_end, min(query_tiles, T // BQ))
            steps = ([(qt, True) for qt in range(my_first, diag_end)]
                     + [(qt, False) for qt in range(diag_end, full_end)]
                     + [(qt, True) for qt in range(full_end, query_tiles)])
            assert my_first >= first_tile and [s[0] for s in steps] == list(range(my_first, query_tiles))
            dk_acc = np.zeros((64, hd))
            dv_acc = np.zeros((64, hd))
            kw, vw = k_tile[64 * wg:64 * wg + 64], v_tile[64 * wg:64 * wg + 64]
            for qt, mask in steps:
                q0 = qt * BQ
                qb, dob = pad(q, BQ, q0), pad(do, BQ, q0)
                st_m, dpt_m = kw @ qb.T, vw @ dob.T  # [64][BQ], rows keys
                rows, cols = layout_b(w, lane, j, e)
                st = st_m[rows, cols]
                dpt = dpt_m[rows, cols]
                lse_b = lse_pad[q0:q0 + BQ]  # the tile's copy (zeros past T)
                dot_b = dot_pad[q0:q0 + BQ]
                row_lse = np.where(e & 1, lse_b[8 * j + 2 * (lane % 4) + 1], lse_b[8 * j + 2 * (lane % 4)])
                p = np.exp2(st * scale_log2 - row_lse * math.log2(math.e))
                if mask:
                    query = q0 + 8 * j + 2 * (lane % 4) + (e & 1)
                    p = np.where((query < key + 8 * (e >> 1)) | (query >= T), 0.0, p)
                else:  # the kernel claims no mask is needed here: check that claim
                    query = q0 + 8 * j + 2 * (lane % 4) + (e & 1)
                    assert not ((query < key + 8 * (e >> 1)) | (query >= T)).any(), "unmasked step needs a mask"
                row_d = np.where(e & 1, dot_b[8 * j + 2 * (lane % 4) + 1], dot_b[8 * j + 2 * (lane % 4)])
                ds = p * (dpt - row_d) * scale
                # registers back to matrices (layout (c) of the A operand = layout (b) rows/cols)
                P = np.zeros((64, BQ))
                DS = np.zeros((64, BQ))
                P[rows, cols] = p
                DS[rows, cols] = ds
                dv_acc += P @ dob
                dk_acc += DS @ qb
            # store_accumulator_rows: acc[4j + 2i + c] -> row key + 8i, column 8j + 2t + c
            ws, ls, js, i_, c_ = np.meshgrid(np.arange(4), np.arange(32), np.arange(hd // 8),
                                             np.arange(2), np.arange(2), indexing="ij")
            rows_l, cols_l = layout_b(ws, ls, js, 2 * i_ + c_)
            r = wg_k0 + 16 * ws + ls // 4 + 8 * i_
            col = 8 * js + 2 * (ls % 4) + c_
            assert (rows_l == r - wg_k0).all() and (cols_l == col).all()
            keep = r < T
            dk[r[keep], col[keep]] = dk_acc[rows_l[keep], cols_l[keep]]
            dv[r[keep], col[keep]] = dv_acc[rows_l[keep], cols_l[keep]]
            np.add.at(written, r[keep], 1)
    assert (written == hd).all(), "every (row, column) of dk (and of dv) written once"
    return dk, dv


def emulate_grad_q(q, k, v, do, lse, dot, hd, BK, WG, scale):
    T = q.shape[0]
    BQ = 64 * WG
    scale_log2 = scale * math.log2(math.e)
    dq = np.full((T, hd), np.nan)
    written = np.zeros(T, dtype=int)
    tiles = (T + BQ - 1) // BQ
    w, lane, j, e = thread_grid(BK)
    for qt in range(tiles):
        q0 = qt * BQ
        key_tiles = (min(q0 + BQ, T) - 1) // BK + 1
        for wg in range(WG):
            wg_q0 = q0 + 64 * wg
            row = wg_q0 + 16 * w + lane // 4
            my_tiles = 0 if wg_q0 >= T else min(key_tiles, (wg_q0 + 64 - 1) // BK + 1)
            first_masked = min(my_tiles, (wg_q0 + 1) // BK)
            lse_row = [np.where(row + 8 * i < T, lse[np.minimum(row + 8 * i, T - 1)] * math.log2(math.e), 0.0)
                       for i in range(2)]
            dot_row = [np.where(row + 8 * i < T, dot[np.minimum(row + 8 * i, T - 1)], 0.0) for i in range(2)]
            qw, dow = pad(q, 64, wg_q0), pad(do, 64, wg_q0)
            dq_acc = np.zeros((64, hd))
            for kt in range(my_tiles):
                mask = kt >= first_masked
                k0 = kt * BK
                kb, vb = pad(k, BK, k0), pad(v, BK, k0)
                rows, cols = layout_b(w, lane, j, e)
                s = (qw @ kb.T)[rows, cols]
                dp = (dow @ vb.T)[rows, cols]
                lr = np.where(e >> 1, lse_row[1], lse_row[0])
                dr = np.where(e >> 1, dot_row[1], dot_row[0])
                p = np.exp2(s * scale_log2 - lr)
                kk = k0 + 8 * j + 2 * (lane % 4) + (e & 1)
                r = row + 8 * (e >> 1)
                if mask:
                    p = np.where((kk > r) | (r >= T), 0.0, p)
                else:  # rows past T are not stored; keys past a row must not occur
                    assert not ((kk > r) & (r < T)).any(), "unmasked step needs a mask"
                ds = p * (dp - dr) * scale
                DS = np.zeros((64, BK))
                DS[rows, cols] = ds
                dq_acc += DS @ kb
            ws, ls, js, i_, c_ = np.meshgrid(np.arange(4), np.arange(32), np.arange(hd // 8),
                                             np.arange(2), np.arange(2), indexing="ij")
            rows_l, cols_l = layout_b(ws, ls, js, 2 * i_ + c_)
            rr = wg_q0 + 16 * ws + ls // 4 + 8 * i_
            col = 8 * js + 2 * (ls % 4) + c_
            keep = rr < T
            dq[rr[keep], col[keep]] = dq_acc[rows_l[keep], cols_l[keep]]
            np.add.at(written, rr[keep], 1)
    assert (written == hd).all(), "every (row, column) of dq written once"
    return dq


def reference(q, k, v, do, scale):
    T = q.shape[0]
    s = q @ k.T * scale
    s[np.triu_indices(T, 1)] = -np.inf
    m = s.max(axis=1, keepdims=True)
    p = np.exp(s - m)
    lse = (np.log(p.sum(axis=1)) + m[:, 0])
    p /= p.sum(axis=1, keepdims=True)
    o = p @ v
    dot = (do * o).sum(axis=1)
    ds = p * (do @ v.T - dot[:, None])
    return dict(dq=ds @ k * scale, dk=ds.T @ q * scale, dv=p.T @ do, lse=lse, dot=dot)


def check_loops():
    rng = np.random.default_rng(0)
    worst = 0.0
    for hd in (64, 128):
        scale = 1 / math.sqrt(hd)
        for T in (1, 2, 17, 63, 64, 65, 127, 128, 129, 191, 192, 200, 255, 256, 257, 300, 513):
            q, k, v, do = (rng.standard_normal((T, hd)) for _ in range(4))
            ref = reference(q, k, v, do, scale)
            for BQ, WG in GRAD_KV[hd]:
                dk, dv = emulate_grad_kv(q, k, v, do, ref["lse"], ref["dot"], hd, BQ, WG, scale)
                err = max(np.abs(dk - ref["dk"]).max(), np.abs(dv - ref["dv"]).max())
                worst = max(worst, err)
                assert err < 1e-9, f"grad_kv hd {hd} T {T} BQ {BQ} WG {WG}: err {err}"
            for BK, WG in GRAD_Q[hd]:
                dq = emulate_grad_q(q, k, v, do, ref["lse"], ref["dot"], hd, BK, WG, scale)
                err = np.abs(dq - ref["dq"]).max()
                worst = max(worst, err)
                assert err < 1e-9, f"grad_q hd {hd} T {T} BK {BK} WG {WG}: err {err}"
        print(f"hd {hd}: loops, masks and layouts of every tile shape agree with the "
              f"float64 gradients for 17 values of T")
    return worst


def main():
    bad = check_addresses()
    print(f"address mismatches, all products of all tile shapes: {bad}")
    worst = check_loops()
    print(f"largest |emulated - reference| over all gradients: {worst:.3g}")
    ok = bad == 0
    print("MODEL OK" if ok else "MODEL FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
