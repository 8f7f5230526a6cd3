// chunk_bwd_dqkwg.wgsl — dq, dk, dw and the gate terms of one chunk (FLA's chunk_bwd_dqkwg).
//
// Per local chunk lc and value head hv (key head hk), rows i, j < len, with h the saved state at
// the chunk's start, dh the gradient of its final state (chunk_bwd_state), gc_last = gc_{len-1}:
//     D_ij  = scale exp(gc_i - gc_j) do_i . v_new_j                      (j <= i)
//     dq_i  = scale exp(gc_i) h do_i + sum_j D_ij k_j
//     dk_i  = sum_r D_ri q_r + exp(gc_last - gc_i) dh v_new_i
//     dw_i  = -h dvn_i
//     dgc_i = q_i . dq_i - k_i . dk_i + [i = len - 1] (exp(gc_last) <dh, h> + sum_r exp(gc_last - gc_r) k_r . dh v_new_r)
// (the last: gc_last scales the state and every key's decay; the rest: each exp(gc_i - gc_j) factor).
// Outputs dqp, dkp, dw [L, HV, C, K] (per value head; rows >= len 0), dgc [L, HV, C].
//
// As matrix products (do, vn, dvn [C, V]; h, dh [K, V]; Qc, Kc [C, K]; rows >= len read as 0, and
// masked rows of do as 0, so a masked row gets dq = 0 but keeps its dk and dw):
//     D  = scale (do vn^T) ∘ Γ, causal                   C x C, over V
//     dq = diag(scale exp(gc)) do h^T  +  D Kc            C x K, over V, then over C
//     dk = diag(exp(gc_last - gc)) vn dh^T  +  D^T Qc     C x K, over V, then over C
//     dw = -dvn h^T                                       C x K, over V
//
// Grid: (HV, local chunks on y/z): one workgroup per chunk and value head, walking column tiles of
// BK = min(4096 / C, K) key columns (the last tile may be partial), so C x BK = 4096 outputs: one
// 4x4 register block of each of dq, dk, dw per thread (tr, tc). Per tile:
//   1. over V, in slices of BS value columns: do, vn, dvn (C x BS) and the tile's rows of h, dh
//      (BK x BS) staged transposed in workgroup memory (vec4 over rows, rows padded by one vec4 so
//      staging stores spread over banks): five vec4 reads per 48 FMAs. In the first tile the same
//      slices give D (thread (ti, tj) a 4x4 block), stored scaled and masked for the rest of the
//      workgroup's life (row-major, vec4 over columns, 16 KiB at C=64).
//   2. over C, in slices of BS rows: k and q (BS x BK, vec4 over columns), dq += D[rows, slice] Kc
//      (4 vec4 of D transposed in registers per 4 terms) and dk += D[slice, rows]^T Qc (one vec4 per
//      term). D is causal: a thread skips the slices right of its rows for dq, left of them for dk.
// Every slice's global reads are issued one slice ahead into registers with fixed counts (16-bit
// inputs two to a word), so no slice waits on memory and the products read workgroup memory only.
// h, dh, q, k are read once per workgroup; do, vn, dvn once per tile (K / BK times: C=64 at K=128
// reads them twice). Keeping them instead would take 3 C V floats beside D; a grid split over
// tiles would recompute D (C^2 V FMAs) per tile, which costs more than re-reading them from L2.
// Gate terms: q_i . dq_i - k_i . dk_i from each thread's own rows of q and k, taken from the C
// slice that holds them (dq is final after that slice, dk holds exactly its state term before it,
// so k . dk_state is taken there too; the rows of k are kept until dk is final); <dh, h> from the
// staged pairs. Per-thread sums are combined in workgroup memory in a fixed order.
// Workgroup memory: sm (D, then the slices; reused for the final sums) and gc: 27,520 bytes.

@group(0) @binding(2) var<storage, read> q: array<u32>;
@group(0) @binding(3) var<storage, read> k: array<u32>;
@group(0) @binding(4) var<storage, read> gc: array<f32>;
@group(0) @binding(5) var<storage, read> ck: array<f32>;
@group(0) @binding(6) var<storage, read> dh: array<f32>;
@group(0) @binding(7) var<storage, read> vn: array<f32>;
@group(0) @binding(8) var<storage, read> dvn: array<f32>;
@group(0) @binding(9) var<storage, read> dout: array<u32>;
// Outputs as vec4: K is a multiple of 16, so every 4-column group of a row is aligned.
@group(0) @binding(10) var<storage, read_write> dqp: array<vec4<f32>>;
@group(0) @binding(11) var<storage, read_write> dkp: array<vec4<f32>>;
@group(0) @binding(12) var<storage, read_write> dw: array<vec4<f32>>;
@group(0) @binding(13) var<storage, read_write> dgc: array<f32>;

const BS: u32 = 8u;                          // contraction slice: value columns, then chunk rows
override BK: u32 = min(4096u / CH, K);       // key columns per tile (a multiple of 16)
override TW: u32 = BK / 4u;                  // threads per 4-row group of the output tile
override NT: u32 = (K + BK - 1u) / BK;       // column tiles
override NV: u32 = V / BS;                   // V slices per tile
override NS: u32 = NV + CH / BS;             // slices per tile: V, then C
override NR: u32 = (BK * BS / 2u + WG - 1u) / WG;  // pairs per thread of a BK-wide slice (<= 4)
override CPL: u32 = CH / 4u + 1u;            // vec4s per row of a staged do / vn / dvn slice
override CPR: u32 = BK / 4u + 1u;            // vec4s per row of a staged h / dh / k / q slice
// Offsets in sm, in vec4s: D, then the V slices; the C slices (k, q) reuse the V slices' space.
override O_DO: u32 = CH * CH / 4u;
override O_VN: u32 = O_DO + BS * CPL;
override O_DVN: u32 = O_VN + BS * CPL;
override O_H: u32 = O_DVN + BS * CPL;
override O_DH: u32 = O_H + BS * CPR;
override O_K: u32 = O_DO;
override O_Q: u32 = O_K + BS * CPR;
// C^2 / 4 + 3 BS (C / 4 + 1) + 2 BS (1024 / C + 1) at most: C=64 1704, C=32 1000, C=16 1224.
const SM: u32 = 1704u;

var<workgroup> sm: array<vec4<f32>, SM>;
var<workgroup> gcs: array<f32, 64>;  // gc of the chunk's rows (0 past len)

// Elements i and i + 1 (i even) of q, k or do: one word for f16/bf16.
fn halves(dt: u32, w: u32, i: u32) -> vec2<f32> {
    return vec2<f32>(decode(dt, w, i), decode(dt, w, i + 1u));
}
fn ld_q2(i: u32) -> vec2<f32> {
    if (QKV_DT == DT_F32) {
        return bitcast<vec2<f32>>(vec2<u32>(q[i], q[i + 1u]));
    }
    return halves(QKV_DT, q[i >> 1u], i);
}
fn ld_k2(i: u32) -> vec2<f32> {
    if (QKV_DT == DT_F32) {
        return bitcast<vec2<f32>>(vec2<u32>(k[i], k[i + 1u]));
    }
    return halves(QKV_DT, k[i >> 1u], i);
}
fn ld_do2(i: u32) -> vec2<f32> {
    if (DO_DT == DT_F32) {
        return bitcast<vec2<f32>>(vec2<u32>(dout[i], dout[i + 1u]));
    }
    return halves(DO_DT, dout[i >> 1u], i);
}

// What the loads of a workgroup need to know.
struct Ctx {
    lid: u32,
    ch: vec3<u32>,   // (start row, len, seq)
    hv: u32,
    hk: u32,
    hb: u32,         // row 0 of this chunk and head in the [L, HV, C, *] scratch
    hs: u32,         // h, the saved state at the chunk's start
    dhb: u32,        // dh
}

// A thread's share of one slice, pairs of adjacent columns. V slice: do, vn, dvn (l: one pair of
// each; C x BS / 2 <= WG pairs), h (r[0 ..]) and dh (r[4 ..]). C slice: k (r[0 ..]), q (r[4 ..]).
struct Slice {
    l: array<vec2<f32>, 3>,
    r: array<vec2<f32>, 8>,
}

// Slice g of the workgroup's walk: tile g / NS, slice g % NS of it (V slices first).
fn fetch(g: u32, cx: Ctx) -> Slice {
    var f: Slice;
    let t0 = (g / NS) * BK;
    let s = g % NS;
    let len = cx.ch.y;
    if (s < NV) {
        let e = min(cx.lid, CH * BS / 2u - 1u);
        let i = e / (BS / 2u);
        let c = s * BS + 2u * (e % (BS / 2u));
        let row = cx.ch.x + min(i, len - 1u);
        f.l[0] = select(vec2<f32>(0.0), ld_do2((row * HV + cx.hv) * V + c), i < len && live(row));
        let at = (cx.hb + i) * V + c;
        f.l[1] = select(vec2<f32>(0.0), vec2<f32>(vn[at], vn[at + 1u]), i < len);
        f.l[2] = select(vec2<f32>(0.0), vec2<f32>(dvn[at], dvn[at + 1u]), i < len);
        for (var x = 0u; x < NR; x++) {
            let ex = min(cx.lid + WG * x, BK * BS / 2u - 1u);
            let m = t0 + ex / (BS / 2u);
            let mc = min(m, K - 1u) * V + s * BS + 2u * (ex % (BS / 2u));
            f.r[x] = select(vec2<f32>(0.0), vec2<f32>(ck[cx.hs + mc], ck[cx.hs + mc + 1u]), m < K);
            f.r[4u + x] = select(vec2<f32>(0.0), vec2<f32>(dh[cx.dhb + mc], dh[cx.dhb + mc + 1u]), m < K);
        }
    } else {
        let j0 = (s - NV) * BS;
        for (var x = 0u; x < NR; x++) {
            let ex = min(cx.lid + WG * x, BK * BS / 2u - 1u);
            let j = j0 + ex / (BK / 2u);
            let m = t0 + 2u * (ex % (BK / 2u));
            let at = ((cx.ch.x + min(j, len - 1u)) * H + cx.hk) * K + min(m, K - 2u);
            let ok = j < len && m < K;
            f.r[x] = select(vec2<f32>(0.0), ld_k2(at), ok);
            f.r[4u + x] = select(vec2<f32>(0.0), ld_q2(at), ok);
        }
    }
    return f;
}

// Columns col, col + 1 of row `row` into a transposed slice at `base` (vec4 over rows).
fn put_t(base: u32, stride: u32, row: u32, col: u32, x: vec2<f32>) {
    sm[base + col * stride + row / 4u][row % 4u] = x.x;
    sm[base + (col + 1u) * stride + row / 4u][row % 4u] = x.y;
}

// Columns col, col + 1 (col even) of row `row` into a slice at `base` (vec4 over columns).
fn put_n(base: u32, stride: u32, row: u32, col: u32, x: vec2<f32>) {
    sm[base + row * stride + col / 4u][col % 4u] = x.x;
    sm[base + row * stride + col / 4u][col % 4u + 1u] = x.y;
}

// Stages slice g from registers; returns the thread's share of <dh, h> in it (V slices).
fn stage(g: u32, f: ptr<function, Slice>, lid: u32) -> f32 {
    var hh = 0.0;
    if (g % NS < NV) {
        if (lid < CH * BS / 2u) {
            let i = lid / (BS / 2u);
            let c = 2u * (lid % (BS / 2u));
            put_t(O_DO, CPL, i, c, (*f).l[0]);
            put_t(O_VN, CPL, i, c, (*f).l[1]);
            put_t(O_DVN, CPL, i, c, (*f).l[2]);
        }
        for (var x = 0u; x < NR; x++) {
            let e = lid + WG * x;
            if (e < BK * BS / 2u) {
                let m = e / (BS / 2u);
                let c = 2u * (e % (BS / 2u));
                put_t(O_H, CPR, m, c, (*f).r[x]);
                put_t(O_DH, CPR, m, c, (*f).r[4u + x]);
                hh += dot((*f).r[x], (*f).r[4u + x]);
            }
        }
    } else {
        for (var x = 0u; x < NR; x++) {
            let e = lid + WG * x;
            if (e < BK * BS / 2u) {
                let j = e / (BK / 2u);
                let m = 2u * (e % (BK / 2u));
                put_n(O_K, CPR, j, m, (*f).r[x]);
                put_n(O_Q, CPR, j, m, (*f).r[4u + x]);
            }
        }
    }
    return hh;
}

// Stages slice g (its reads were issued a slice earlier) and issues the next slice's reads.
fn advance(g: u32, nx: ptr<function, Slice>, cx: Ctx) -> f32 {
    workgroupBarrier();
    let hh = stage(g, nx, cx.lid);
    workgroupBarrier();
    if (g + 1u < NT * NS) {
        *nx = fetch(g + 1u, cx);
    }
    return hh;
}

fn zero4() -> array<vec4<f32>, 4> {
    return array<vec4<f32>, 4>();
}

// Rows r0 .. r0 + 4, column group tc, of a staged C slice at `base`.
fn rows4(base: u32, r0: u32, tc: u32) -> array<vec4<f32>, 4> {
    return array<vec4<f32>, 4>(
        sm[base + r0 * CPR + tc],
        sm[base + (r0 + 1u) * CPR + tc],
        sm[base + (r0 + 2u) * CPR + tc],
        sm[base + (r0 + 3u) * CPR + tc],
    );
}

// Row-wise dot products of two 4x4 blocks.
fn dots(a: array<vec4<f32>, 4>, b: array<vec4<f32>, 4>) -> vec4<f32> {
    return vec4<f32>(dot(a[0], b[0]), dot(a[1], b[1]), dot(a[2], b[2]), dot(a[3], b[3]));
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let lc = local_chunk(wid);
    if (lc >= P.n_local) {
        return;
    }
    let hv = wid.x;
    let ch = chunk_at(lc);
    let hb = (lc * HV + hv) * CH;
    if (lid < CH) {
        gcs[lid] = select(0.0, gc[hb + min(lid, ch.y - 1u)], lid < ch.y);
    }
    let gl = gc[hb + ch.y - 1u];
    let cx = Ctx(lid, ch, hv, hv / GROUP, hb, h_base(lc, hv), (lc * HV + hv) * K * V);

    let q4 = CH / 4u;
    let ti = lid / q4;                  // D: rows ti*4 .. +4, columns tj*4 .. +4
    let tj = lid % q4;
    let in_d = ti < q4;
    let tr = lid / TW;                  // dq, dk, dw: rows tr*4 .. +4, columns t0 + tc*4 .. +4
    let tc = lid % TW;
    let in_tile = tr < q4;
    let own = (4u * tr / BS) * BS;      // first row of the C slice that holds this thread's rows
    var xs = vec4<f32>(0.0);            // per row: q . dq - k . dk over this thread's columns
    var st = 0.0;                       // k . dk_state over this thread's blocks
    var hh = 0.0;                       // <dh, h> over the pairs this thread staged
    var nx = fetch(0u, cx);
    for (var t = 0u; t < NT; t++) {
        let t0 = t * BK;
        let out_ok = in_tile && t0 + 4u * tc < K;
        // Declared per tile, so that none is live in the phase that does not use it.
        var aq = zero4();
        var ak = zero4();
        var aw = zero4();
        var ad = zero4();   // D (first tile only)

        // 1. Over V: do h^T, vn dh^T, dvn h^T; D = do vn^T in the first tile.
        for (var s = 0u; s < NV; s++) {
            hh += advance(t * NS + s, &nx, cx);
            if (in_tile) {
                for (var kk = 0u; kk < BS; kk++) {
                    let bh = sm[O_H + kk * CPR + tc];
                    outer4(&aq, sm[O_DO + kk * CPL + tr], bh);
                    outer4(&aw, sm[O_DVN + kk * CPL + tr], bh);
                    outer4(&ak, sm[O_VN + kk * CPL + tr], sm[O_DH + kk * CPR + tc]);
                }
            }
            if (t == 0u && in_d) {
                for (var kk = 0u; kk < BS; kk++) {
                    outer4(&ad, sm[O_DO + kk * CPL + ti], sm[O_VN + kk * CPL + tj]);
                }
            }
        }
        if (t == 0u && in_d) {
            let jv = vec4<u32>(0u, 1u, 2u, 3u) + 4u * tj;
            let gj = vec4<f32>(gcs[4u * tj], gcs[4u * tj + 1u], gcs[4u * tj + 2u], gcs[4u * tj + 3u]);
            for (var a = 0u; a < 4u; a++) {
                let i = 4u * ti + a;
                let keep = (jv <= vec4<u32>(i)) & vec4<bool>(i < ch.y);
                sm[i * q4 + tj] = select(vec4<f32>(0.0), P.scale * exp(gcs[i] - gj) * ad[a], keep);
            }
        }
        if (in_tile) {
            for (var r = 0u; r < 4u; r++) {
                let i = 4u * tr + r;
                aq[r] *= P.scale * exp(gcs[i]);
                ak[r] *= exp(gl - gcs[i]);
                if (out_ok) {
                    dw[((hb + i) * K + t0 + 4u * tc) / 4u] = select(vec4<f32>(0.0), -aw[r], i < ch.y);
                }
            }
        }

        // 2. Over C: dq += D Kc, dk += D^T Qc.
        var ko = zero4();   // this thread's rows of k (the tile's columns)
        for (var s = NV; s < NS; s++) {
            hh += advance(t * NS + s, &nx, cx);
            let j0 = (s - NV) * BS;
            if (in_tile) {
                if (j0 == own) {
                    ko = rows4(O_K, 4u * tr - j0, tc);
                    let sd = dots(ko, ak); // dk is its state term alone here
                    st += sd.x + sd.y + sd.z + sd.w;
                }
                if (j0 <= own && j0 < ch.y) {
                    for (var jq = 0u; jq < BS / 4u; jq++) {
                        let c = j0 / 4u + jq;
                        let dr = transpose(mat4x4<f32>(
                            sm[4u * tr * q4 + c],
                            sm[(4u * tr + 1u) * q4 + c],
                            sm[(4u * tr + 2u) * q4 + c],
                            sm[(4u * tr + 3u) * q4 + c],
                        ));
                        for (var jj = 0u; jj < 4u; jj++) {
                            outer4(&aq, dr[jj], sm[O_K + (4u * jq + jj) * CPR + tc]);
                        }
                    }
                }
                if (j0 >= own && j0 < ch.y) {
                    for (var jj = 0u; jj < BS; jj++) {
                        outer4(&ak, sm[(j0 + jj) * q4 + tr], sm[O_Q + jj * CPR + tc]);
                    }
                }
                if (j0 == own) {
                    xs += dots(rows4(O_Q, 4u * tr - j0, tc), aq); // dq is final here
                }
            }
        }
        if (in_tile) {
            xs -= dots(ko, ak);
            if (out_ok) {
                for (var r = 0u; r < 4u; r++) {
                    let i = 4u * tr + r;
                    let at = ((hb + i) * K + t0 + 4u * tc) / 4u;
                    dqp[at] = select(vec4<f32>(0.0), aq[r], i < ch.y);
                    dkp[at] = select(vec4<f32>(0.0), ak[r], i < ch.y);
                }
            }
        }
    }

    // dgc: row sums over the TW threads of each row; the last row's term summed over all threads
    // (C partial sums of WG / C threads each, then those). Fixed order throughout.
    workgroupBarrier();
    sm[lid] = xs;
    sm[WG + lid / 4u][lid % 4u] = st + exp(gl) * hh;
    workgroupBarrier();
    var d = 0.0;
    if (lid < CH) {
        for (var c = 0u; c < TW; c++) {
            d += sm[(lid / 4u) * TW + c][lid % 4u];
        }
        var z = 0.0;
        for (var x = 0u; x < WG / CH; x++) {
            let p = lid * (WG / CH) + x;
            z += sm[WG + p / 4u][p % 4u];
        }
        sm[WG + WG / 4u + lid / 4u][lid % 4u] = z;
    }
    workgroupBarrier();
    if (lid < CH) {
        if (lid == ch.y - 1u) {
            for (var x = 0u; x < CH; x++) {
                d += sm[WG + WG / 4u + x / 4u][x % 4u];
            }
        }
        dgc[hb + lid] = select(0.0, d, lid < ch.y);
    }
}
