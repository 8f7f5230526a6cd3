// chunk_wu.wgsl — w and u (FLA's recompute_w_u): the chunk's keys and values through A.
//
// Per local chunk lc and value head hv (key head hk = hv / GROUP), for rows i < C:
//     w[i, :] = sum_{j <= i} A_ij bm_j exp(gc_j) k_j        [C x K]
//     u[i, :] = sum_{j <= i} A_ij bm_j v_j                  [C x V]
// (bm = beta with masked tokens zeroed; padded rows j >= len contribute nothing.)
// Outputs w [L, HV, C, K], u [L, HV, C, V] (f16 with U16); with W16 (chunk_common.wgsl) also wk16
// [L, HV, 2, C, K] (-w, and K ∘ exp(gc_last - gc) from the key slices staged for w) and with OUT16 k^T of qk16
// (the last plane of [L, H, QPL, C, K], as [K][C]; by the first value head of each key head), all f16 two
// to a word; w in f32 then only with WV32. (A separate pass made them before, reading w and k per
// value head again.)
//
// Grid: (HV * (K + V) / BD, local chunks on y/z): workgroup (hv, column tile) computes BD columns of
// w (tiles below K) or of u, out[:, tile] = A X[:, tile] with X = (bm exp(gc)) ∘ K or bm ∘ V, as a
// contraction over the chunk's C rows in slices of BS. Each slice of A (transposed, vec4 over rows)
// and of X (vec4 over columns) is staged in workgroup memory, its global reads issued one slice
// ahead into registers with fixed counts (the staging rule of docs/PERF.md): no staging step waits
// on its own load, and the product loop reads workgroup memory only. Thread (tr, tc) accumulates
// 4 rows x 4 columns, two vec4 reads per 16 FMAs, and skips slices right of its rows (A is lower
// triangular, so they add zeros). Issuing all of the workgroup's reads at the start instead (A
// staged whole, X in two halves) was slower on the H100: 0.39 against 0.19 ms per window.

@group(0) @binding(2) var<storage, read> k: array<u32>;
@group(0) @binding(3) var<storage, read> v: array<u32>;
@group(0) @binding(4) var<storage, read> gc: array<f32>;
@group(0) @binding(5) var<storage, read> bm: array<f32>;
// A and w as vec4, u as pairs of words: C, K, V and BD are multiples of 16, so every access below is
// aligned.
@group(0) @binding(6) var<storage, read> a: array<vec4<f32>>;
@group(0) @binding(7) var<storage, read_write> w: array<vec4<f32>>;
// (u: two words per 2 values in f32, per 4 halves with U16.)
@group(0) @binding(8) var<storage, read_write> u: array<vec2<u32>>;
@group(0) @binding(9) var<storage, read_write> wk16: array<u32>;
@group(0) @binding(10) var<storage, read_write> qk16: array<u32>;

const BS: u32 = 16u;   // contraction slice (rows j of X, columns of A)
const CP: u32 = 17u;   // vec4s per row of a transposed slice: C / 4 and BD / 4 <= 16, plus one

var<workgroup> la: array<vec4<f32>, 272>;   // slice of A, [jj][i / 4] at jj * CP + i / 4
var<workgroup> rx: array<vec4<f32>, 272>;   // slice of X, [jj][c / 4] at jj * CP + c / 4
var<workgroup> fs: array<f32, 64>;          // row factor of X: bm exp(gc) (w) or bm (u); 0 past len
var<workgroup> fk: array<f32, 64>;          // exp(gc_last - gc) (W16); 0 past len
// Two pairs of X per thread (BD = 64): thread lid holds rows 2 jb and 2 jb + 1 of one column pair, so
// the k^T words of qk16 (two rows each) are made from registers; otherwise they are staged in kt.
override NP2: bool = BS * BD == 4u * WG;
override KTN: u32 = select(4u, BS * BD, OUT16 && !NP2);
var<workgroup> kt: array<f32, KTN>;         // OUT16, !NP2: the slice's raw keys [jj][c] at jj * BD + c

// Elements i and i + 1 (i even) of k or v: one word for f16/bf16. Loading X in pairs halves the
// load instructions of the 16-bit inputs (H100, bf16: 0.194 -> 0.158 ms per window).
fn ld2(is_k: bool, i: u32) -> vec2<f32> {
    if (QKV_DT == DT_F32) {
        if (is_k) {
            return vec2<f32>(bitcast<f32>(k[i]), bitcast<f32>(k[i + 1u]));
        }
        return vec2<f32>(bitcast<f32>(v[i]), bitcast<f32>(v[i + 1u]));
    }
    var w: u32;
    if (is_k) {
        w = k[i >> 1u];
    } else {
        w = v[i >> 1u];
    }
    return vec2<f32>(decode(QKV_DT, w, i), decode(QKV_DT, w, i + 1u));
}

// A thread's share of one slice: one vec4 of A (4 columns of a row; C x BS / 4 vec4s in all, so
// threads past C * 4 hold none) and up to 2 pairs of adjacent unscaled values of X (BS x BD / WG).
struct Slice {
    l: vec4<f32>,
    r: array<vec2<f32>, 2>,
}

// (row within the slice, first column) of a thread's pair slot e = lid + WG x. With NP2, slots e and
// e + WG are the two rows of a 2 x 2 block; otherwise slots run row by row, and BD = 16 (fewer pairs
// than threads) repeats the last pair in the surplus threads, which load and store the same values
// again: the count stays fixed and the loops free of branches.
fn pair_at(e: u32) -> vec2<u32> {
    if (NP2) {
        let b = e % WG;
        return vec2<u32>(2u * (b / (BD / 2u)) + e / WG, 2u * (b % (BD / 2u)));
    }
    let x = min(e, BS * BD / 2u - 1u);
    return vec2<u32>(x / (BD / 2u), 2u * (x % (BD / 2u)));
}

// Slice j0: columns j0 .. j0 + BS of A, rows j0 .. j0 + BS of K or V (rows past the chunk's end 0).
// ha: the chunk's first row in `a` (a_rows).
fn fetch(j0: u32, lid: u32, ch: vec3<u32>, ha: u32, is_w: bool, hk: u32, hv: u32, d0: u32) -> Slice {
    var f: Slice;
    if (lid < CH * (BS / 4u)) {
        f.l = a[((ha + lid / 4u) * CH + j0) / 4u + lid % 4u];
    }
    for (var x = 0u; x < (BS * BD / 2u + WG - 1u) / WG; x++) {
        let pc = pair_at(lid + WG * x);
        let j = j0 + pc.x;
        let row = ch.x + min(j, ch.y - 1u);
        let c = pc.y;
        var val: vec2<f32>;
        if (is_w) {
            val = ld2(true, (row * H + hk) * K + d0 + c);
        } else {
            val = ld2(false, (row * HV + hv) * V + d0 - K + c);
        }
        f.r[x] = select(vec2<f32>(0.0), val, j < ch.y);
    }
    return f;
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let lc = local_chunk(wid);
    if (lc >= P.n_local) {
        return;
    }
    let tiles = (K + V) / BD;
    let hv = wid.x / tiles;
    let d0 = (wid.x % tiles) * BD;
    let is_w = d0 < K;
    let hk = hv / GROUP;
    let ch = chunk_at(lc);
    let hb = (lc * HV + hv) * CH;
    let ha = a_rows(lc, hv);

    var nx = fetch(0u, lid, ch, ha, is_w, hk, hv, d0);
    if (lid < CH) {
        var f = 0.0;
        if (lid < ch.y) {
            f = bm[hb + lid];
            if (is_w) {
                f *= exp(gc[hb + lid]);
            }
        }
        fs[lid] = f;
        fk[lid] = select(0.0, exp(gc[hb + ch.y - 1u] - gc[hb + min(lid, ch.y - 1u)]), lid < ch.y);
    }

    let q4 = CH / 4u;
    let tc = lid % (BD / 4u);
    let tr = lid / (BD / 4u);
    let in_tile = tr < q4;
    var acc: array<vec4<f32>, 4>;
    for (var r = 0u; r < 4u; r++) {
        acc[r] = vec4<f32>(0.0);
    }
    for (var j0 = 0u; j0 < CH; j0 += BS) {
        workgroupBarrier();
        if (lid < CH * (BS / 4u)) {
            let i = lid / 4u;
            let jq = (lid % 4u) * 4u;
            la[jq * CP + i / 4u][i % 4u] = nx.l.x;
            la[(jq + 1u) * CP + i / 4u][i % 4u] = nx.l.y;
            la[(jq + 2u) * CP + i / 4u][i % 4u] = nx.l.z;
            la[(jq + 3u) * CP + i / 4u][i % 4u] = nx.l.w;
        }
        for (var x = 0u; x < (BS * BD / 2u + WG - 1u) / WG; x++) {
            let pc = pair_at(lid + WG * x);
            let jj = pc.x;
            let c = pc.y;
            let f = fs[j0 + jj];
            rx[jj * CP + c / 4u][c % 4u] = f * nx.r[x].x;
            rx[jj * CP + c / 4u][c % 4u + 1u] = f * nx.r[x].y;
            if (W16 && is_w) {
                // The staged keys as the walk's operand K ∘ exp(gc_last - gc), and raw for qk16.
                let j = j0 + jj;
                let fkj = fk[j];
                wk16[hb * K + (CH * K + j * K + d0 + c) / 2u] = pack_halves(fkj * nx.r[x].x, fkj * nx.r[x].y);
                if (OUT16 && !NP2 && hv % GROUP == 0u) {
                    kt[jj * BD + c] = nx.r[x].x;
                    kt[jj * BD + c + 1u] = nx.r[x].y;
                }
            }
        }
        // k^T of qk16: element (m, j) of the plane at m * C + j, two rows to a word, so the output
        // pass loads K^T tiles row-major (a column-major load from global memory cost 0.4 ms of its
        // 4.6 at B=8 T=8192 on the H100, docs/PERF.md R60).
        let base = ((lc * H + hk) * QPL * CH + (QPL - 1u) * CH) * (K / 2u); // k^T: the last plane
        if (W16 && OUT16 && NP2 && is_w && hv % GROUP == 0u) {
            let pc = pair_at(lid); // rows pc.x, pc.x + 1 in nx.r[0], nx.r[1]
            let at = base + ((d0 + pc.y) * CH + j0 + pc.x) / 2u;
            qk16[at] = pack_halves(nx.r[0].x, nx.r[1].x);
            qk16[at + CH / 2u] = pack_halves(nx.r[0].y, nx.r[1].y);
        }
        workgroupBarrier();
        if (W16 && OUT16 && !NP2 && is_w && hv % GROUP == 0u) {
            for (var e = lid; e < BD * BS / 2u; e += WG) {
                let c = e / (BS / 2u);
                let jj = 2u * (e % (BS / 2u));
                qk16[base + ((d0 + c) * CH + j0 + jj) / 2u] = pack_halves(kt[jj * BD + c], kt[(jj + 1u) * BD + c]);
            }
        }
        if (j0 + BS < CH) {
            nx = fetch(j0 + BS, lid, ch, ha, is_w, hk, hv, d0);
        }
        if (in_tile && tr * 4u + 3u >= j0) {
            for (var kk = 0u; kk < BS; kk++) {
                outer4(&acc, la[kk * CP + tr], rx[kk * CP + tc]);
            }
        }
    }
    if (in_tile) {
        for (var r = 0u; r < 4u; r++) {
            let i = tr * 4u + r;
            if (is_w) {
                if (WV32 || !W16) {
                    w[((hb + i) * K + d0 + tc * 4u) / 4u] = acc[r];
                }
                if (W16) {
                    let at = hb * K + (i * K + d0 + tc * 4u) / 2u;
                    wk16[at] = pack_halves(-acc[r].x, -acc[r].y);
                    wk16[at + 1u] = pack_halves(-acc[r].z, -acc[r].w);
                }
            } else if (U16) {
                u[((hb + i) * V + d0 - K + tc * 4u) / 4u] =
                    vec2<u32>(pack_halves(acc[r].x, acc[r].y), pack_halves(acc[r].z, acc[r].w));
            } else {
                let at = ((hb + i) * V + d0 - K + tc * 4u) / 2u;
                u[at] = bitcast<vec2<u32>>(acc[r].xy);
                u[at + 1u] = bitcast<vec2<u32>>(acc[r].zw);
            }
        }
    }
}
