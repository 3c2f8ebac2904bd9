"""Shared ``@triton.jit`` building blocks of the implicit-GEMM 3-D convolution kernels.

A convolution over a channels-last (NDHWC) input is a GEMM that is never materialised:

    M = output positions (n, d, h, w)      rows of the tile, gathered from the input
    N = output channels                    columns of the tile, read from the packed weight
    K = kernel taps × input channels       the reduction

The packed weight is the matrix ``[K, C_out]`` with K ordered (kd, kh, kw, c_in), i.e.
``weight.permute(2, 3, 4, 1, 0).reshape(-1, C_out)`` (see ``pack_weight`` in the kernel modules): a
K row is contiguous along C_out, and consecutive K rows of one tap are consecutive input channels,
which are contiguous in an NDHWC input too.

Two main loops compute one fp32 accumulator tile ``[BLOCK_M, BLOCK_N]``:

* ``conv_tile_channel_blocks`` walks K as (tap, channel block): every input load is BLOCK_M rows of
  BLOCK_K contiguous channels. The (tap, block) pairs are flattened into ONE loop so that Triton's
  software pipeliner (``num_stages``) overlaps the loads of step i+1.. with the MMA of step i even
  when C_in fits in one block (a nested per-tap loop would give it nothing to pipeline).
* ``conv_tile_flat_k`` is for tiny C_in (C3D's conv1 has C_in = 3, K = 81): a channel block of 16
  would waste 13/16 of every MMA, so K = taps·C_in is walked in BLOCK_K chunks and each element's
  (tap, channel) is decoded on the fly (a gathered load).

Borders (padding), channel counts that are no multiple of the block, and rows past the end are all
handled by load masks: masked elements read as 0 and contribute nothing. Rows address the input as
``x_ptr + row_offset[r] + ...`` in int32: callers pass an ``x_ptr`` already advanced (in int64) to
the first sample of the tile and check that the samples one tile spans fit in int32. Per-row state
is kept small on purpose: it lives in registers for the whole K loop (see the sm_90 register
report in tests/test_triton_sm90.py).

Input prologue (``INPUT_NORM``): the input may be the RAW output of the previous conv whose
training-mode BatchNorm and activation were deferred to this kernel (prologue fusion): every loaded
input element becomes ``act((x − mean)·γ/σ + β)`` (``normalize_activate``, the same code and order
as ``bn_act_pool``, so the values are bit-identical to the materialised activation), and elements in
the padding are zeroed AFTER the transform, as the padded normalised tensor would read. The
per-channel (mean, var, γ, β) come as one fp32 [4, C_in] tensor. The normalised activation is then
never written to memory in the forward.

Later kernels (training forward with a statistics epilogue, dgrad, wgrad) reuse these helpers, and
the elementwise kernels over a conv output (``bn_act_pool`` and its backward) share the tile, pool
window and BatchNorm helpers at the end of this file.
"""

import triton
import triton.language as tl


@triton.jit
def round_to_tf32(v):
    """fp32 → the nearest TF32 value (10 mantissa bits, ties away from zero: ``cvt.rna.tf32.f32``),
    still fp32. Tensor cores read an fp32 operand as TF32 by dropping its low 13 bits, about twice
    the error of rounding, which is what cuBLAS and cuDNN do. Bit arithmetic, so it also runs under
    the interpreter; a NaN stays NaN (one whose payload sits in the low bits would become inf)."""
    bits = v.to(tl.uint32, bitcast=True)
    rounded = ((bits + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)
    return tl.where(v != v, v, rounded)


@triton.jit
def dot(a, b, acc, INPUT_PRECISION: tl.constexpr):
    """``acc + a @ b``, accumulated in fp32; fp32 operands in "tf32" precision (tensor cores) are
    rounded to TF32 first (``round_to_tf32``) rather than truncated by the hardware."""
    if INPUT_PRECISION == "tf32":
        a = round_to_tf32(a)
        b = round_to_tf32(b)
    return tl.dot(a, b, acc, input_precision=INPUT_PRECISION)


@triton.jit
def apply_activation(y, ACTIVATION: tl.constexpr, negative_slope):
    """``none`` / ``relu`` / ``leaky_relu(negative_slope)`` / ``silu``, elementwise, in y's dtype
    (silu computed in fp32 and rounded once, as torch computes it). NaN stays NaN, as in torch.relu
    (a diverging run must show, not turn into zeros)."""
    if ACTIVATION == "relu":
        y = tl.where(y < 0, 0.0, y)
    elif ACTIVATION == "leaky_relu":
        y = tl.where(y > 0, y, y * negative_slope)
    elif ACTIVATION == "silu":
        z = y.to(tl.float32)
        y = (z * sigmoid(z)).to(y.dtype)
    return y


@triton.jit
def sigmoid(z):
    """1 / (1 + e^-z) in fp32 with the approximate division (2 ulp): the IEEE one is a subroutine
    call on sm_90, whose spills showed in the backward kernels."""
    return tl.fdiv(1.0, 1.0 + tl.exp(-z), ieee_rounding=False)


@triton.jit
def silu_derivative(z):
    """d silu / dz = σ(z)·(1 + z·(1 − σ(z))), fp32, as torch's silu_backward."""
    s = sigmoid(z)
    return s * (1.0 + z * (1.0 - s))


@triton.jit
def pool_max(pooled, a):
    """The running maximum of a pool window. NaN wins, as in MaxPool3d: Triton's default maximum
    returns the other operand, which would turn a NaN into a number (or -inf)."""
    return tl.maximum(pooled, a, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def normalize_activate(v, mean, scale, beta, ACTIVATION: tl.constexpr, negative_slope):
    """``act((v − mean)·scale + β)`` in v's dtype: BatchNorm in fp32 with (v − mean) taken before
    scaling (a large mean cancels exactly), rounded to v's dtype, then the activation — the
    reference's order. ``mean``/``scale``/``beta`` come broadcastable against v."""
    z = ((v.to(tl.float32) - mean) * scale + beta).to(v.dtype)
    # cast back: triton 3.6 computes where() of 16-bit floats in fp32
    return apply_activation(z, ACTIVATION, negative_slope).to(v.dtype)


@triton.jit
def input_norm_coefficients(stats_ptr, offs_c, c_mask, channels, eps):
    """(mean, scale = γ/σ, β) of the deferred BatchNorm for input channels ``offs_c``, from the
    [4, channels] fp32 rows (mean, biased var, γ, β)."""
    mean, _, scale, beta = batch_norm_coefficients(
        stats_ptr, stats_ptr + channels, stats_ptr + 2 * channels, stats_ptr + 3 * channels,
        offs_c, c_mask, eps, True, True)
    return mean, scale, beta


@triton.jit
def conv_tile_channel_blocks(
    x_ptr, w_ptr,
    row_offset, in_d0, in_h0, in_w0, row_mask, offs_n,
    in_d, in_h, in_w, in_c, out_c,
    dil_d, dil_h, dil_w,
    in_stats_ptr, in_eps, in_slope,
    KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, INPUT_NORM: tl.constexpr, INPUT_ACTIVATION: tl.constexpr,
):
    """fp32 tile ``[BLOCK_M, BLOCK_N]`` of conv(x, w) with K walked as (tap, channel block).

    Row r of the tile is the output position whose receptive field starts at input coordinate
    ``(in_d0[r], in_h0[r], in_w0[r])`` (output coordinate × stride − padding) of the sample that
    starts at element ``row_offset[r]`` of ``x_ptr`` (int32); rows with ``row_mask`` False read
    nothing. Tiles: ``offs_n`` are the BLOCK_N output channels.
    """
    offs_k = tl.arange(0, BLOCK_K)
    col_mask = offs_n < out_c
    stride_xw = in_c  # NDHWC element strides of one sample
    stride_xh = in_w * in_c
    stride_xd = in_h * stride_xh
    k_blocks = tl.cdiv(in_c, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for step in range(KD * KH * KW * k_blocks):
        tap = step // k_blocks
        c0 = (step - tap * k_blocks) * BLOCK_K
        kd = tap // (KH * KW)
        kh = (tap // KW) % KH
        kw = tap % KW
        d = in_d0 + kd * dil_d
        h = in_h0 + kh * dil_h
        w = in_w0 + kw * dil_w
        in_bounds = row_mask & (d >= 0) & (d < in_d) & (h >= 0) & (h < in_h) & (w >= 0) & (w < in_w)
        offs_c = c0 + offs_k
        c_mask = offs_c < in_c
        a = tl.load(
            x_ptr + (row_offset + d * stride_xd + h * stride_xh + w * stride_xw)[:, None] + offs_c[None, :],
            mask=in_bounds[:, None] & c_mask[None, :], other=0.0,
        )
        if INPUT_NORM:
            mean, scale, beta = input_norm_coefficients(in_stats_ptr, offs_c, c_mask, in_c, in_eps)
            a = normalize_activate(a, mean[None, :], scale[None, :], beta[None, :], INPUT_ACTIVATION, in_slope)
            a = tl.where(in_bounds[:, None] & c_mask[None, :], a, 0.0).to(x_ptr.dtype.element_ty)
        b = tl.load(
            w_ptr + (tap * in_c + offs_c)[:, None] * out_c + offs_n[None, :],
            mask=c_mask[:, None] & col_mask[None, :], other=0.0,
        )
        acc = dot(a, b, acc, INPUT_PRECISION)
    return acc


@triton.jit
def conv_tile_flat_k(
    x_ptr, w_ptr,
    row_offset, in_d0, in_h0, in_w0, row_mask, offs_n,
    in_d, in_h, in_w, in_c, out_c,
    dil_d, dil_h, dil_w,
    in_stats_ptr, in_eps, in_slope,
    KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, INPUT_NORM: tl.constexpr, INPUT_ACTIVATION: tl.constexpr,
):
    """Same tile as ``conv_tile_channel_blocks``, for tiny C_in: K = taps·C_in walked in BLOCK_K
    chunks, each K index decoded into (tap, channel) and gathered.

    Per-row state lives in registers for the whole loop. With at most 32 taps (C3D's 3×3×3) every row
    is reduced before the loop to one int32 offset and a bitmask of the taps that fall inside the
    input (bit t = tap t): element (r, k) reads ``x_ptr + row_offset[r] + col_offset[k]`` if bit
    tap(k) of ``tap_ok[r]`` is set, one add and one shift per element instead of three coordinates
    and six compares. Larger kernels (the video ResNets' 3×7×7 stems: 147 taps) take the general
    path, which checks each element's coordinates.
    """
    stride_xw = in_c
    stride_xh = in_w * in_c
    stride_xd = in_h * stride_xh
    if KD * KH * KW <= 32:
        tap_ok = tl.zeros((BLOCK_M,), dtype=tl.int32)
        for kd in tl.static_range(KD):
            d = in_d0 + kd * dil_d
            ok_d = row_mask & (d >= 0) & (d < in_d)
            for kh in tl.static_range(KH):
                h = in_h0 + kh * dil_h
                ok_dh = ok_d & (h >= 0) & (h < in_h)
                for kw in tl.static_range(KW):
                    w = in_w0 + kw * dil_w
                    ok = ok_dh & (w >= 0) & (w < in_w)
                    tap_ok = tap_ok | (ok.to(tl.int32) << ((kd * KH + kh) * KW + kw))
        row_offset = row_offset + in_d0 * stride_xd + in_h0 * stride_xh + in_w0 * stride_xw

    offs_k = tl.arange(0, BLOCK_K)
    col_mask = offs_n < out_c
    k_total = KD * KH * KW * in_c
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, k_total, BLOCK_K):
        offs_kk = k0 + offs_k
        k_mask = offs_kk < k_total
        tap = tl.minimum(offs_kk // in_c, KD * KH * KW - 1)  # clamped: a shift ≥ 32 is undefined
        c = offs_kk - tap * in_c
        tap_d = (tap // (KH * KW)) * dil_d
        tap_h = ((tap // KW) % KH) * dil_h
        tap_w = (tap % KW) * dil_w
        # loaded as A^T [BLOCK_K, BLOCK_M]: with no contiguous direction Triton spreads a warp's
        # threads along the last dimension, here the rows, so each thread holds few rows (and
        # neighbouring rows are neighbouring output positions: the warp's reads still coalesce)
        if KD * KH * KW <= 32:
            inside = ((tap_ok[None, :] >> tap[:, None]) & 1) != 0
            col_offset = tap_d * stride_xd + tap_h * stride_xh + tap_w * stride_xw + c
            a_ptrs = x_ptr + (col_offset[:, None] + row_offset[None, :])
        else:
            d = in_d0[None, :] + tap_d[:, None]
            h = in_h0[None, :] + tap_h[:, None]
            w = in_w0[None, :] + tap_w[:, None]
            inside = (row_mask[None, :] & (d >= 0) & (d < in_d) & (h >= 0) & (h < in_h)
                      & (w >= 0) & (w < in_w))
            a_ptrs = x_ptr + (row_offset[None, :] + d * stride_xd + h * stride_xh + w * stride_xw + c[:, None])
        a_t = tl.load(a_ptrs, mask=inside & k_mask[:, None], other=0.0)
        if INPUT_NORM:
            mean, scale, beta = input_norm_coefficients(in_stats_ptr, c, k_mask, in_c, in_eps)
            a_t = normalize_activate(a_t, mean[:, None], scale[:, None], beta[:, None], INPUT_ACTIVATION, in_slope)
            a_t = tl.where(inside & k_mask[:, None], a_t, 0.0).to(x_ptr.dtype.element_ty)
        b = tl.load(
            w_ptr + offs_kk[:, None] * out_c + offs_n[None, :],
            mask=k_mask[:, None] & col_mask[None, :], other=0.0,
        )
        acc = dot(tl.trans(a_t), b, acc, INPUT_PRECISION)
    return acc


@triton.jit
def conv_tile(
    x_ptr, w_ptr,
    row_offset, in_d0, in_h0, in_w0, row_mask, offs_n,
    in_d, in_h, in_w, in_c, out_c,
    dil_d, dil_h, dil_w,
    in_stats_ptr, in_eps, in_slope,
    KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    FLAT_K: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    INPUT_NORM: tl.constexpr, INPUT_ACTIVATION: tl.constexpr,
):
    """One fp32 conv tile, by the main loop ``FLAT_K`` selects (see the module docstring)."""
    if FLAT_K:
        acc = conv_tile_flat_k(
            x_ptr, w_ptr, row_offset, in_d0, in_h0, in_w0, row_mask, offs_n,
            in_d, in_h, in_w, in_c, out_c, dil_d, dil_h, dil_w, in_stats_ptr, in_eps, in_slope,
            KD, KH, KW, BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION, INPUT_NORM, INPUT_ACTIVATION,
        )
    else:
        acc = conv_tile_channel_blocks(
            x_ptr, w_ptr, row_offset, in_d0, in_h0, in_w0, row_mask, offs_n,
            in_d, in_h, in_w, in_c, out_c, dil_d, dil_h, dil_w, in_stats_ptr, in_eps, in_slope,
            KD, KH, KW, BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION, INPUT_NORM, INPUT_ACTIVATION,
        )
    return acc


@triton.jit
def split_position(offs, size_d, size_h, size_w):
    """Flat NDHW position → (n, d, h, w) for a grid of size_d × size_h × size_w per sample."""
    w = offs % size_w
    t = offs // size_w
    h = t % size_h
    t = t // size_h
    d = t % size_d
    n = t // size_d
    return n, d, h, w


@triton.jit
def output_tile(pid, out_c, out_positions, out_d, out_h, out_w, sample_size,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Where program ``pid`` of a 1-D grid (channel blocks fastest, so the programs that share one
    block of positions run side by side and read the same input rows from L2) works.

    Returns the tile's position and channel offsets with their masks, the positions split into
    (n, d, h, w), the tile's first sample and each row's int32 offset from that sample's input.
    Rows address x relative to the tile's first sample (int64 only once per tile, in the caller),
    which keeps per-row state small; the launcher checks that the samples one tile spans fit int32.
    """
    n_blocks = tl.cdiv(out_c, BLOCK_N)
    pid_m = pid // n_blocks
    pid_n = pid - pid_m * n_blocks
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    sample, pos_d, pos_h, pos_w = split_position(offs_m, out_d, out_h, out_w)
    first_sample = (pid_m * BLOCK_M) // (out_d * out_h * out_w)
    row_offset = (sample - first_sample) * sample_size
    return (offs_m, offs_n, offs_m < out_positions, offs_n < out_c,
            pos_d, pos_h, pos_w, first_sample, row_offset)


# --------------------------------------------------------------------------------------------
# elementwise kernels over an NDHWC conv output: (pooled) positions × channels tiles
# --------------------------------------------------------------------------------------------


@triton.jit
def channel_tile(pid, positions, channels, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Program ``pid``'s tile of a 1-D grid over ``positions`` × ``channels`` (channel blocks
    fastest): (pid_p, offs_p, offs_c, p_mask, c_mask)."""
    c_blocks = tl.cdiv(channels, BLOCK_C)
    pid_p = pid // c_blocks
    pid_c = pid - pid_p * c_blocks
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    return pid_p, offs_p, offs_c, offs_p < positions, offs_c < channels


@triton.jit
def pool_window_position(
    window, sample, pooled_d, pooled_h, pooled_w, p_mask, conv_d, conv_h, conv_w,
    POOL_KH: tl.constexpr, POOL_KW: tl.constexpr,
    POOL_SD: tl.constexpr, POOL_SH: tl.constexpr, POOL_SW: tl.constexpr,
    POOL_PD: tl.constexpr, POOL_PH: tl.constexpr, POOL_PW: tl.constexpr,
):
    """(int64 conv position, valid) of offset ``window`` (d, h, w order) of each row's pool window;
    rows in the pool's padding or past the conv output are not valid."""
    d = pooled_d * POOL_SD - POOL_PD + window // (POOL_KH * POOL_KW)
    h = pooled_h * POOL_SH - POOL_PH + (window // POOL_KW) % POOL_KH
    w = pooled_w * POOL_SW - POOL_PW + window % POOL_KW
    valid = p_mask & (d >= 0) & (d < conv_d) & (h >= 0) & (h < conv_h) & (w >= 0) & (w < conv_w)
    return ((sample.to(tl.int64) * conv_d + d) * conv_h + h) * conv_w + w, valid


@triton.jit
def batch_norm_coefficients(mean_ptr, var_ptr, gamma_ptr, beta_ptr, offs_c, c_mask, eps,
                            HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr):
    """Per channel (fp32): mean, 1/σ, scale = γ/σ and β (0 without β), so that
    z = (y − mean)·scale + β. ``1/tl.sqrt``: libdevice's rsqrt fails under the interpreter."""
    mean = tl.load(mean_ptr + offs_c, mask=c_mask, other=0.0)
    invstd = 1.0 / tl.sqrt(tl.load(var_ptr + offs_c, mask=c_mask, other=1.0) + eps)
    scale = invstd
    if HAS_GAMMA:
        scale = scale * tl.load(gamma_ptr + offs_c, mask=c_mask, other=1.0)
    if HAS_BETA:
        beta = tl.load(beta_ptr + offs_c, mask=c_mask, other=0.0)
    else:
        beta = tl.zeros_like(mean)
    return mean, invstd, scale, beta


@triton.jit
def tile_statistics(y, mask, count):
    """Per channel (column) of a tile of conv outputs: the mean and M2 (sum of squared deviations)
    of the ``count`` valid rows, over the stored (rounded) values y, by the corrected two-pass
    algorithm: the first-pass mean is off by ~√n·ulp(|mean|) when |mean| ≫ std, but the
    deviations from it are small and exact (Sterbenz), so their sum corrects the mean and
    M2 = Σdev² − (Σdev)²/n keeps the variance. NaN propagates (a NaN conv output makes running_var
    NaN, as stock's)."""
    v = tl.where(mask, y.to(tl.float32), 0.0)
    rough_mean = tl.sum(v, axis=0) / count
    dev = tl.where(mask, v - rough_mean[None, :], 0.0)
    dev_sum = tl.sum(dev, axis=0)
    tile_mean = rough_mean + dev_sum / count
    tile_m2 = tl.maximum(tl.sum(dev * dev, axis=0) - dev_sum * dev_sum / count, 0.0,
                         propagate_nan=tl.PropagateNan.ALL)
    return tile_mean, tile_m2
