"""Triton source of the fused pooling + router kernels (imported lazily, see pooled_router.py)."""

import triton
import triton.language as tl


def _pool_linear1(
    h_ptr, m_ptr, w1_ptr, part_ptr,
    T, H, D, NWIN, S,
    s_hb, s_ht, s_hh, s_mb, s_mt, s_w1d, s_w1h,
    NWP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_F32: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1)

    # The row's real tokens (any subset of its positions): their count.
    count = tl.sum(tl.zeros((BLOCK_T,), tl.int32), axis=0)
    for t0 in range(0, T, BLOCK_T):
        offs = t0 + tl.arange(0, BLOCK_T)
        m = tl.load(m_ptr + b * s_mb + offs * s_mt, mask=offs < T, other=0) != 0
        count += tl.sum(m.to(tl.int32), axis=0)

    # tensor_split: W windows, the first r of size q + 1, the others of size q.
    W = tl.minimum(count, NWIN)
    Wd = tl.maximum(W, 1)
    q = count // Wd
    r = count % Wd
    big = r * (q + 1)
    qd = tl.maximum(q, 1)

    h_offs = s * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = h_offs < H
    wins = tl.arange(0, NWP)
    sums = tl.zeros((NWP, BLOCK_H), tl.float32)
    row = h_ptr + b * s_hb
    seen = count * 0  # real tokens before this tile
    for t0 in range(0, T, BLOCK_T):
        offs = t0 + tl.arange(0, BLOCK_T)
        t_ok = (tl.load(m_ptr + b * s_mb + offs * s_mt, mask=offs < T, other=0) != 0) & (offs < T)
        real = t_ok.to(tl.int32)
        rank = seen + tl.cumsum(real, axis=0) - real  # each real token's rank among the row's real tokens
        seen += tl.sum(real, axis=0)
        win = tl.where(rank < big, rank // (q + 1), r + (rank - big) // qd)
        x = tl.load(
            row + offs[:, None].to(tl.int64) * s_ht + h_offs[None, :] * s_hh,
            mask=t_ok[:, None] & h_ok[None, :],
            other=0.0,
        )  # padding is never read
        onehot = (win[None, :] == wins[:, None]) & t_ok[None, :]
        if DOT_F32:  # fp32 input (exact fp32 products, no TF32), or the interpreter's bf16
            sums = tl.dot(onehot.to(tl.float32), x.to(tl.float32), acc=sums, input_precision="ieee")
        else:  # bf16/fp16 tensor cores: 0/1 weights are exact, fp32 accumulation
            sums = tl.dot(onehot.to(x.dtype), x, acc=sums)

    size = tl.where(wins < r, q + 1, q)
    inv = tl.where(wins < W, 1.0 / tl.maximum(size, 1).to(tl.float32), 0.0)
    means = sums * inv[:, None]  # [NWP, BLOCK_H]

    d_offs = tl.arange(0, BLOCK_D)
    w1t = tl.load(
        w1_ptr + d_offs[None, :] * s_w1d + h_offs[:, None] * s_w1h,
        mask=h_ok[:, None] & (d_offs[None, :] < D),
        other=0.0,
    )  # [BLOCK_H, BLOCK_D] slice of W1^T
    part = tl.dot(means, w1t, input_precision="ieee")  # [NWP, BLOCK_D]
    out = part_ptr + ((b * S + s) * NWIN + wins[:, None]) * D + d_offs[None, :]
    tl.store(out, part, mask=(wins[:, None] < NWIN) & (d_offs[None, :] < D))

def _router_head(
    m_ptr, part_ptr, b1_ptr, w2_ptr, b2_ptr, out_ptr,
    T, D, NWIN, S, K,
    s_mb, s_mt,
    NWP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    count = tl.sum(tl.zeros((BLOCK_T,), tl.int32), axis=0)
    for t0 in range(0, T, BLOCK_T):
        offs = t0 + tl.arange(0, BLOCK_T)
        m = tl.load(m_ptr + b * s_mb + offs * s_mt, mask=offs < T, other=0) != 0
        count += tl.sum(m.to(tl.int32), axis=0)
    W = tl.minimum(count, NWIN)

    wins = tl.arange(0, NWP)
    d_offs = tl.arange(0, BLOCK_D)
    ok = (wins[:, None] < NWIN) & (d_offs[None, :] < D)
    pre = tl.zeros((NWP, BLOCK_D), tl.float32)
    for s in range(0, S):
        pre += tl.load(part_ptr + ((b * S + s) * NWIN + wins[:, None]) * D + d_offs[None, :], mask=ok, other=0.0)
    pre += tl.load(b1_ptr + d_offs, mask=d_offs < D, other=0.0)[None, :]
    # GELU(tanh): 0.5 x (1 + tanh(u)) = x * sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3)
    u = 0.7978845608028654 * (pre + 0.044715 * pre * pre * pre)
    g = pre * tl.sigmoid(2.0 * u)

    k_offs = tl.arange(0, BLOCK_K)
    w2 = tl.load(
        w2_ptr + k_offs[None, :] * D + d_offs[:, None],
        mask=(k_offs[None, :] < K) & (d_offs[:, None] < D),
        other=0.0,
    )  # [BLOCK_D, BLOCK_K] = W2^T
    b2 = tl.load(b2_ptr + k_offs, mask=k_offs < K, other=0.0)
    # [NWP, BLOCK_D] x [BLOCK_D, BLOCK_K] as a broadcast reduction (K = 3 is below tl.dot's minimum)
    logits = tl.sum(g[:, :, None] * w2[None, :, :], axis=1) + b2[None, :]  # [NWP, BLOCK_K]
    logits = tl.where((wins < W)[:, None], logits, 0.0)
    mean = tl.sum(logits, axis=0) / W.to(tl.float32)  # NaN for an empty row (W = 0)
    tl.store(out_ptr + b * K + k_offs, mean, mask=k_offs < K)

_KERNELS: dict = {}

def _kernels(interpret: bool):
    """The two kernels, jitted lazily for the compiler or the CPU interpreter."""
    # triton.jit gives an interpreted function when TRITON_INTERPRET was set
    # before triton was imported (triton's own library functions are decorated
    # at its import); the key keeps the two apart if the variable changes.
    if interpret not in _KERNELS:
        _KERNELS[interpret] = (triton.jit(_pool_linear1), triton.jit(_router_head))
    return _KERNELS[interpret]


