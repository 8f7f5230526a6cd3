// recurrent_bwd.metal — Metal twin of wgsl/recurrent_bwd.wgsl + wgsl/accum_f32_atomic.wgsl.
//
// Same math, thread layout, bindings ([[buffer(i)]] = WGSL @binding(i), the index wgpu's Metal
// backend assigns for a one-group layout) and results as the WGSL twin; a test
// (tests/msl_interface.rs) checks the bindings, the Params struct and the constants against naga's
// reflection of the WGSL. Differences, all in how, not what:
//   - column sums by simd_shuffle_xor (the KT threads of a column are consecutive lanes of one
//     simdgroup), with a threadgroup-memory fallback when the simdgroup is narrower than KT;
//   - gradient sums: threadgroup pre-reduction over the workgroup's BV columns, then atomic_float
//     adds (MSL 3.0, Apple7+ / Mac2) to device memory;
//   - no runtime bounds checks (indices are in bounds by construction, as in wgdelta's unchecked
//     WGSL builds).
// The override constants (H, HV, K, V, BV, KT, KR, dtypes, flags, C) are prepended by the host as
// `constant constexpr uint NAME = value;` lines generated from the pipeline key
// (kernels::msl_constants), so this file does not compile alone.
//
// STATUS: written against the WGSL twin and checked here only for its interface; it has not been
// compiled or run on Apple hardware in this repository's CI.

#include <metal_stdlib>
using namespace metal;

struct Params {
    uint n_seqs;
    uint seq_base;
    uint mask_off;
    uint wg_per_row;
    float scale;
    uint ck_blocks;
    uint dh0_off;
    uint qk_len;
    uint g_len;
    uint b_len;
    uint dq_off;
    uint dk_off;
    uint dg_off;
    uint dbeta_off;
    uint _pad0;
    uint _pad1;
};

constant constexpr uint GROUP = HV / H;
constant constexpr uint WG = KT * BV;
constant constexpr uint MAX_KR = 16u;
constant constexpr uint ROWS_MAX = 512u;
constant constexpr uint RED_SLOTS = 256u;
constant constexpr uint DT_F32 = 0u;
constant constexpr uint DT_F16 = 1u;

static inline float decode_at(uint dt, const device uint* buf, uint i) {
    if (dt == DT_F32) {
        return as_type<float>(buf[i]);
    }
    uint w = buf[i >> 1];
    uint h = (i & 1u) ? (w >> 16) : (w & 0xffffu);
    if (dt == DT_F16) {
        return float(as_type<half>(ushort(h)));
    }
    return as_type<float>(h << 16);
}

static inline uint byte_of(uint w, uint i) {
    return (w >> (8u * (i & 3u))) & 0xffu;
}

static inline uint s_off(uint i, uint j) {
    return LAYOUT_VK ? j * K + i : i * V + j;
}

static inline float decay_of(float d_scalar, const device uint* g, uint hrow, uint ic) {
    if (!GATE_PER_KEY) {
        return d_scalar;
    }
    float x = decode_at(G_DT, g, hrow * K + ic);
    return GATE_LINEAR ? x : exp(x);
}

// Sum over the KT threads of one column (consecutive lanes), as WGSL's column_sum.
static inline float4 column_sum(float4 x, uint lid, uint parity, uint simd_width, threadgroup float4* red) {
    if (KT <= simd_width) {
        float4 s = x;
        for (ushort off = 1; off < KT; off <<= 1) {
            s += simd_shuffle_xor(s, off);
        }
        return s;
    }
    uint base = parity * RED_SLOTS;
    red[base + lid] = x;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    uint first = base + (lid / KT) * KT;
    float4 s = float4(0.0f);
    for (uint r = 0; r < KT; r++) {
        s += red[first + r];
    }
    return s;
}

kernel void wgdelta_recurrent_bwd(
    constant Params& P [[buffer(0)]],
    device const uint* q [[buffer(1)]],
    device const uint* k [[buffer(2)]],
    device const uint* v [[buffer(3)]],
    device const uint* g [[buffer(4)]],
    device const uint* beta [[buffer(5)]],
    device const uint* info [[buffer(6)]],
    device const uint* d_o [[buffer(7)]],
    device const uint* dht [[buffer(8)]],
    device const float* ckpt [[buffer(9)]],
    device float* dv [[buffer(10)]],
    device float* work [[buffer(11)]],
    device atomic_float* acc [[buffer(12)]],
    uint3 wid [[threadgroup_position_in_grid]],
    uint lid [[thread_index_in_threadgroup]],
    uint simd_width [[threads_per_simdgroup]])
{
    threadgroup float4 rows_red[ROWS_MAX];
    threadgroup float4 red[2 * RED_SLOTS];
    threadgroup uint2 seq_bounds;

    const uint nl = wid.y + wid.z * P.wg_per_row;
    if (nl >= P.n_seqs) {
        return;  // whole threadgroup: uniform
    }
    const uint n = P.seq_base + nl;
    const uint tiles = V / BV;
    const uint hv = wid.x / tiles;
    const uint vt = wid.x % tiles;
    const uint j0 = vt * BV;
    const uint hk = hv / GROUP;
    const uint r = lid % KT;
    const uint c = lid / KT;
    const uint j = j0 + c;
    const uint hist = (nl * HV * tiles + wid.x) * C * KR * WG;

    if (lid == 0u) {
        seq_bounds = uint2(info[n], info[n + 1u]);
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    const uint2 bounds = seq_bounds;
    const uint sbase = (n * HV + hv) * K * V;
    const uint cbase = (n * HV + hv) * P.ck_blocks * K * V;

    float ds[MAX_KR];
    float s[MAX_KR];
    float kk[MAX_KR];
    float qq[MAX_KR];
    float dd[MAX_KR];
    float dqp[MAX_KR];
    for (uint m = 0; m < KR; m++) {
        const uint i = r + KT * m;
        ds[m] = (HAS_DHT && i < K) ? decode_at(DHT_DT, dht, sbase + s_off(i, j)) : 0.0f;
    }

    uint ph = 0u;
    const uint blocks = (bounds.y - bounds.x + C - 1u) / C;
    for (uint blk = blocks; blk > 0u; blk--) {
        const uint start = bounds.x + (blk - 1u) * C;
        const uint end = min(start + C, bounds.y);
        const uint cb = cbase + (blk - 1u) * K * V;
        for (uint m = 0; m < KR; m++) {
            const uint i = r + KT * m;
            s[m] = i < K ? ckpt[cb + i * V + j] : 0.0f;
        }
        // Replay: keep each P = S_{t-1} in this threadgroup's slice of `work`.
        for (uint row = start; row < end; row++) {
            const uint hrow = row * HV + hv;
            const uint kq_base = (row * H + hk) * K;
            const bool live = !HAS_MASK || byte_of(info[P.mask_off + row / 4u], row) != 0u;
            float d_scalar = 1.0f;
            if (!GATE_PER_KEY) {
                d_scalar = decode_at(G_DT, g, hrow);
                if (!GATE_LINEAR) {
                    d_scalar = exp(d_scalar);
                }
            }
            const uint h = hist + (row - start) * KR * WG;
            float4 part = float4(0.0f);
            for (uint m = 0; m < KR; m++) {
                const uint i = r + KT * m;
                const uint ic = min(i, K - 1u);
                work[h + m * WG + lid] = s[m];
                kk[m] = i < K ? decode_at(QKV_DT, k, kq_base + ic) : 0.0f;
                s[m] *= live ? decay_of(d_scalar, g, hrow, ic) : 1.0f;
                part.x += s[m] * kk[m];
            }
            const float4 tot = column_sum(part, lid, ph & 1u, simd_width, red);
            ph++;
            const float u = live ? decode_at(BETA_DT, beta, hrow) * (decode_at(QKV_DT, v, hrow * V + j) - tot.x) : 0.0f;
            for (uint m = 0; m < KR; m++) {
                s[m] += kk[m] * u;
            }
        }

        // Walk the block back, carrying dS.
        for (uint row = end; row > start; row--) {
            const uint t = row - 1u;
            const uint hrow = t * HV + hv;
            const uint kq_base = (t * H + hk) * K;
            const bool live = !HAS_MASK || byte_of(info[P.mask_off + t / 4u], t) != 0u;
            float d_scalar = 1.0f;
            if (!GATE_PER_KEY) {
                d_scalar = decode_at(G_DT, g, hrow);
                if (!GATE_LINEAR) {
                    d_scalar = exp(d_scalar);
                }
            }
            const float bt = decode_at(BETA_DT, beta, hrow);
            const uint h = hist + (t - start) * KR * WG;
            float4 a = float4(0.0f);
            for (uint m = 0; m < KR; m++) {
                const uint i = r + KT * m;
                const uint ic = min(i, K - 1u);
                s[m] = work[h + m * WG + lid];
                kk[m] = i < K ? decode_at(QKV_DT, k, kq_base + ic) : 0.0f;
                qq[m] = i < K ? decode_at(QKV_DT, q, kq_base + ic) : 0.0f;
                dd[m] = decay_of(d_scalar, g, hrow, ic);
                a += float4(dd[m] * s[m] * kk[m], s[m] * kk[m], 0.0f, 0.0f);
            }
            const float4 sa = column_sum(a, lid, ph & 1u, simd_width, red);
            ph++;
            const float e_j = decode_at(QKV_DT, v, hrow * V + j) - sa.x;
            const float do_j = live ? decode_at(DO_DT, d_o, hrow * V + j) : 0.0f;
            float4 b = float4(0.0f);
            for (uint m = 0; m < KR; m++) {
                const float st = dd[m] * s[m] + bt * kk[m] * e_j;
                dqp[m] = P.scale * st * do_j;
                ds[m] += P.scale * qq[m] * do_j;
                b += float4(kk[m] * ds[m], ds[m] * s[m], 0.0f, 0.0f);
            }
            const float4 sb = column_sum(b, lid, ph & 1u, simd_width, red);
            ph++;
            const float kds = sb.x;
            const float de = bt * kds;
            if (r == 0u) {
                dv[hrow * V + j] = live ? de : 0.0f;
            }
            const float dd_col = sb.y - de * sa.y;
            for (uint m = 0; m < KR; m++) {
                const uint i = r + KT * m;
                const float dkp = bt * ds[m] * e_j - dd[m] * s[m] * de;
                const float dsp = ds[m] - kk[m] * de;
                float z = 0.0f;
                if (GATE_PER_KEY) {
                    z = dsp * s[m] * (GATE_LINEAR ? 1.0f : dd[m]);
                } else if (i == 0u) {
                    z = dd_col * (GATE_LINEAR ? 1.0f : d_scalar);
                }
                if (i < K) {
                    rows_red[i * BV + c] = float4(dqp[m], dkp, z, i == 0u ? e_j * kds : 0.0f);
                }
                ds[m] = live ? dd[m] * dsp : ds[m];
            }
            threadgroup_barrier(mem_flags::mem_threadgroup);
            if (live) {
                const uint rq = (t * H + hk) * K;
                for (uint i = lid; i < K; i += WG) {
                    float4 x = float4(0.0f);
                    for (uint cc = 0; cc < BV; cc++) {
                        x += rows_red[i * BV + cc];
                    }
                    atomic_fetch_add_explicit(&acc[P.dq_off + rq + i], x.x, memory_order_relaxed);
                    atomic_fetch_add_explicit(&acc[P.dk_off + rq + i], x.y, memory_order_relaxed);
                    if (GATE_PER_KEY) {
                        atomic_fetch_add_explicit(&acc[P.dg_off + hrow * K + i], x.z, memory_order_relaxed);
                    } else if (i == 0u) {
                        atomic_fetch_add_explicit(&acc[P.dg_off + hrow], x.z, memory_order_relaxed);
                    }
                    if (i == 0u) {
                        atomic_fetch_add_explicit(&acc[P.dbeta_off + hrow], x.w, memory_order_relaxed);
                    }
                }
            }
            threadgroup_barrier(mem_flags::mem_threadgroup);
        }
    }

    if (HAS_DH0) {
        for (uint m = 0; m < KR; m++) {
            const uint i = r + KT * m;
            if (i < K) {
                work[P.dh0_off + sbase + s_off(i, j)] = ds[m];
            }
        }
    }
}
