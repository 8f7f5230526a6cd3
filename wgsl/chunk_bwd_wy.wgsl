// chunk_bwd_wy.wgsl — back through the WY form and the gate (FLA's prepare_wy_repr_bwd, and the
// reverse cumulative sum of the gate gradient).
//
// Per local chunk lc and value head hv (key head hk), rows i, j, r < len, with X_j = bm_j exp(gc_j) k_j,
// Y_j = bm_j v_j (w = A X, u = A Y) and M_ij = bm_i exp(gc_i - gc_j) k_i . k_j (A = (I + M)^-1):
//     dX_i = sum_{r >= i} A_ri dw_r,   dY_i = sum_{r >= i} A_ri dvn_r,   dv_i = bm_i dY_i
//     dA_ij = dw_i . X_j + dvn_i . Y_j                     (j < i; only those entries reach dM)
//     dM = StrictLower(-A^T dA A^T),  G_ij = dM_ij exp(gc_i - gc_j)
//     Z_i = sum_j G_ij k_j,   Zc_i = sum_r G_ri bm_r k_r
//     dk_i += bm_i Z_i + Zc_i + bm_i exp(gc_i) dX_i        (added to dkp)
//     dbeta_i = exp(gc_i) k_i . dX_i + v_i . dY_i + k_i . Z_i
//     dgc_i += bm_i (exp(gc_i) k_i . dX_i + k_i . Z_i) - k_i . Zc_i
//     dg_t = sum_{i >= t} dgc_i (gc is an inclusive cumulative sum); a masked token gets dg = dbeta
//     = 0; a Linear gate's gradient is divided by its decay.
// Writes dv, dbeta, dg (the call's tensors) for the chunk's rows, and dkp. Every C x C intermediate
// stays in workgroup memory and registers.
//
// Grid: (HV, local chunks on y/z); one workgroup does the whole chunk of one value head.
// Tiling. All C x C matrices live in ONE workgroup array mt (C x C, 16 vec4 a row, the vec4
// column XOR-swizzled by row / 4 so that a 4x4 block read down a column hits eight different
// bank groups). A, read once from global memory, keeps the lower triangle and the diagonal (ones);
// the strictly upper triangle holds in turn dA^T, T^T and G^T (each of those is needed only below
// the diagonal, so its transpose fits above it). With U = Z + exp(gc) dX the pass runs:
//   1. dA = [dw | dvn] [X | Y]^T, a contraction over K + V in slices of BS columns staged
//      transposed in ls / rs (vec4 over rows, rows padded to CP vec4s), each slice's global reads
//      issued one slice ahead. Thread t < (C/4)(C/4 + 1)/2 owns block (ti, tj), ti >= tj, of the
//      lower triangle (4x4 in registers): the blocks above the diagonal are zero and never computed.
//   2. T = dA A^T, its lower part only (the part dM needs): 4x4 blocks over 4x4 blocks of mt.
//   3. G = -(A^T T) ∘ Γ, strictly lower, likewise; then G^T into the upper triangle.
//   4. Column tiles of TW = 64 over K, then over V, each a contraction over the chunk's C rows in
//      slices of BS rows (k / v and dw / dvn staged in ls / rs, loads one slice ahead, continuing
//      from phase 1 across tiles). Thread (tr, tc) owns rows 4tr.., columns 4tc..; per block of
//      four rows s it reads one 4x4 block of mt (rows s, columns i) that holds A_si (s >= i) and
//      G_is (s < i), and for Zc the block (rows i, columns s) = G_si (s > i):
//          value tile:  dY += A^T dvn                                   -> dv = bm dY
//          key tile:    U += G k + (e ∘ A^T) dw,  Zc += G^T (bm ∘ k)   -> dkp += bm U + Zc
//      plus the row sums k.U, k.Zc, v.dY (k, v of the thread's own rows kept from the slice that
//      staged them), reduced over tc in a fixed order; then dbeta, dg. Value tiles come first:
//      between them and the key tiles A's columns are scaled by e_i in place, once, rather than in
//      every product.
// Every product reads only workgroup memory and registers, about 2 vec4 reads per 16 FMAs (4x4
// blocks).
// Global reads per workgroup: A, gc, bm, dgc once; k, v, dw, dvn twice (phase 1 and phase 4: dA
// needs all of them before G exists, and they do not fit on chip in between); dkp once.
// Workgroup memory (C = 64): mt 16 KiB + ls, rs 2 x 4352 B + gc, bm, dg terms 768 B = 25,856 B.

@group(0) @binding(2) var<storage, read> k: array<u32>;
@group(0) @binding(3) var<storage, read> v: array<u32>;
@group(0) @binding(4) var<storage, read> g: array<u32>;
@group(0) @binding(5) var<storage, read> gc: array<f32>;
@group(0) @binding(6) var<storage, read> bm: array<f32>;
// A, dw, dvn, dkp and dv as vec4: C, K and V are multiples of 16, so every access is aligned.
@group(0) @binding(7) var<storage, read> a: array<vec4<f32>>;
@group(0) @binding(8) var<storage, read> dw: array<vec4<f32>>;
@group(0) @binding(9) var<storage, read> dvn: array<vec4<f32>>;
@group(0) @binding(10) var<storage, read> dgc: array<f32>;
@group(0) @binding(11) var<storage, read_write> dkp: array<vec4<f32>>;
@group(0) @binding(12) var<storage, read_write> dv: array<vec4<f32>>;
@group(0) @binding(13) var<storage, read_write> dbeta: array<f32>;
@group(0) @binding(14) var<storage, read_write> dg: array<f32>;

const BS: u32 = 16u;   // slice: columns of K / V (phase 1), rows of the chunk (phase 4)
const CP: u32 = 17u;   // vec4s per row of a staged slice: C / 4 and TW / 4 <= 16, plus one
const TW: u32 = 64u;   // columns of an output tile (phase 4)
const IOTA: vec4<u32> = vec4<u32>(0u, 1u, 2u, 3u);

var<workgroup> mt: array<vec4<f32>, 1024>;  // C x C: (r, c) at mi(r, c / 4)[c % 4]
var<workgroup> ls: array<vec4<f32>, 272>;   // staged slices (BS x CP vec4s): dw / dvn, then k / v
var<workgroup> rs: array<vec4<f32>, 272>;   // X / Y, then dw / dvn
var<workgroup> gcs: array<f32, 64>;         // gc of the chunk's rows (0 past its end)
var<workgroup> bm4: array<vec4<f32>, 16>;   // bm of rows 4x .. 4x + 4 (0 past the end)
var<workgroup> dgt: array<f32, 64>;         // dgc_i with this pass's terms

// This workgroup's chunk (start row, len, seq), key and value head, and scratch row offset.
var<private> ch: vec3<u32>;
var<private> hk: u32;
var<private> hv: u32;
var<private> hb: u32;

// Index of the vec4 holding columns 4 c4 .. 4 c4 + 4 of row r of mt (r < 64, c4 < 16).
fn mi(r: u32, c4: u32) -> u32 {
    return (r & 63u) * 16u + ((c4 ^ (r >> 2u)) & 15u);
}

// Four elements from the two words that hold them (16-bit inputs).
fn halves4(w0: u32, w1: u32) -> vec4<f32> {
    return vec4<f32>(decode(QKV_DT, w0, 0u), decode(QKV_DT, w0, 1u), decode(QKV_DT, w1, 0u), decode(QKV_DT, w1, 1u));
}

// Elements i .. i + 4 of k or v (i a multiple of 4).
fn ld_k4(i: u32) -> vec4<f32> {
    if (QKV_DT == DT_F32) {
        return bitcast<vec4<f32>>(vec4<u32>(k[i], k[i + 1u], k[i + 2u], k[i + 3u]));
    }
    return halves4(k[i >> 1u], k[(i >> 1u) + 1u]);
}

fn ld_v4(i: u32) -> vec4<f32> {
    if (QKV_DT == DT_F32) {
        return bitcast<vec4<f32>>(vec4<u32>(v[i], v[i + 1u], v[i + 2u], v[i + 3u]));
    }
    return halves4(v[i >> 1u], v[(i >> 1u) + 1u]);
}

fn ld_g(i: u32) -> f32 { return decode(G_DT, g[word_of(G_DT, i)], i); }

// Four columns of one row of the chunk: k or v (decoded), and dw or dvn.
struct Pair {
    x: vec4<f32>,
    y: vec4<f32>,
}

// Row `row` of the chunk, columns col .. col + 4 of k and dw (is_key) or of v and dvn; zero past
// the chunk's end or the head dim (the clamped address stays in bounds).
fn fetch(is_key: bool, row: u32, col: u32) -> Pair {
    let n = select(V, K, is_key);
    let ok = row < ch.y && col < n;
    let r = min(row, ch.y - 1u);
    let c = min(col, n - 4u);
    var f: Pair;
    if (is_key) {
        f.x = ld_k4(((ch.x + r) * H + hk) * K + c);
        f.y = dw[((hb + r) * K + c) / 4u];
    } else {
        f.x = ld_v4(((ch.x + r) * HV + hv) * V + c);
        f.y = dvn[((hb + r) * V + c) / 4u];
    }
    f.x = select(vec4<f32>(0.0), f.x, ok);
    f.y = select(vec4<f32>(0.0), f.y, ok);
    return f;
}

// Phase 1, slice s0 of the K + V columns: row lid / 4, four columns (threads past 4 C load nothing
// that is kept).
fn fetch_da(s0: u32, lid: u32) -> Pair {
    let is_key = s0 < K;
    return fetch(is_key, lid / 4u, select(s0 - K, s0, is_key) + 4u * (lid % 4u));
}

// Phase 4, slice z: tile t = z / (C / BS) (value tiles first), row BS (z % (C / BS)) + lid / (TW / 4),
// four columns.
fn fetch_tile(z: u32, lid: u32) -> Pair {
    let t = z / (CH / BS);
    let vt = (V + TW - 1u) / TW;
    let is_key = t >= vt;
    let q = TW / 4u;
    return fetch(is_key, (z % (CH / BS)) * BS + lid / q, select(t, t - vt, is_key) * TW + 4u * (lid % q));
}

// Rows r0 .. r0 + 4 of mt at vec4 column c4.
fn rows4(r0: u32, c4: u32) -> array<vec4<f32>, 4> {
    var m: array<vec4<f32>, 4>;
    for (var x = 0u; x < 4u; x++) {
        m[x] = mt[mi(r0 + x, c4)];
    }
    return m;
}

// Rows r0 .. r0 + 4 of a staged slice (ls or rs) at vec4 column c4.
fn slice4(left: bool, r0: u32, c4: u32) -> array<vec4<f32>, 4> {
    var m: array<vec4<f32>, 4>;
    for (var x = 0u; x < 4u; x++) {
        let at = (r0 + x) * CP + c4;
        if (left) {
            m[x] = ls[at];
        } else {
            m[x] = rs[at];
        }
    }
    return m;
}

fn tr4(m: array<vec4<f32>, 4>) -> array<vec4<f32>, 4> {
    return array<vec4<f32>, 4>(
        vec4<f32>(m[0].x, m[1].x, m[2].x, m[3].x),
        vec4<f32>(m[0].y, m[1].y, m[2].y, m[3].y),
        vec4<f32>(m[0].z, m[1].z, m[2].z, m[3].z),
        vec4<f32>(m[0].w, m[1].w, m[2].w, m[3].w),
    );
}

// Block m with only the entries m[x][y] with lo <= y - x <= hi kept (a diagonal block's triangle).
fn band(m: array<vec4<f32>, 4>, lo: i32, hi: i32) -> array<vec4<f32>, 4> {
    var o: array<vec4<f32>, 4>;
    for (var x = 0u; x < 4u; x++) {
        let d = vec4<i32>(IOTA) - vec4<i32>(i32(x));
        o[x] = select(vec4<f32>(0.0), m[x], (d >= vec4<i32>(lo)) & (d <= vec4<i32>(hi)));
    }
    return o;
}

// acc += sum_x l[x] (4 rows) outer r[x] (4 columns): 64 FMAs.
fn mac4(acc: ptr<function, array<vec4<f32>, 4>>, l: array<vec4<f32>, 4>, r: array<vec4<f32>, 4>) {
    for (var x = 0u; x < 4u; x++) {
        outer4(acc, l[x], r[x]);
    }
}

// Block b (rows 4 ti.., columns 4 tj.., ti >= tj) transposed into the upper triangle of mt. On the
// diagonal only the entries below it move: the cells on and below the diagonal keep A.
fn put_t(b: array<vec4<f32>, 4>, ti: u32, tj: u32) {
    let bt = tr4(b);
    for (var c = 0u; c < 4u; c++) {
        let at = mi(4u * tj + c, ti);
        var val = bt[c];
        if (ti == tj) {
            val = select(mt[at], val, IOTA > vec4<u32>(c));
        }
        mt[at] = val;
    }
}

// Block (ti, tj), ti >= tj, of the lower triangle of (C/4) x (C/4) blocks taken by thread lid, row
// by row; ti >= C/4 for the threads past the triangle.
fn tri_block(lid: u32) -> vec2<u32> {
    var ti = 0u;
    for (var x = 1u; x < 23u; x++) {
        if (x * (x + 1u) / 2u <= lid) {
            ti = x;
        }
    }
    return vec2<u32>(ti, lid - ti * (ti + 1u) / 2u);
}

// acc += A_si x_s (e_i A_si in key tiles) for the four rows s = 4 sb.. (staged at slice rows 4 q..)
// with s >= i, for the thread's rows i = 4 tr.. and columns (x = the staged dvn or dw).
fn a_part(acc: ptr<function, array<vec4<f32>, 4>>, sb: u32, q: u32, tr: u32, tc: u32) {
    var al = rows4(4u * sb, tr);   // A_si at (s, i)
    if (sb == tr) {
        al = band(al, -3, 0);
    }
    mac4(acc, al, slice4(false, 4u * q, tc));
}

// Before the key tiles: A's entries (lower triangle and diagonal of mt) times exp(gc) of their column.
fn scale_a(lid: u32) {
    let q4 = CH / 4u;
    for (var x = 0u; x < (CH * q4 + WG - 1u) / WG; x++) {
        let e = lid + WG * x;
        if (e < CH * q4) {
            let r = e / q4;
            let c = 4u * (e % q4);
            let at = mi(r, c / 4u);
            let f = exp(vec4<f32>(gcs[c], gcs[c + 1u], gcs[c + 2u], gcs[c + 3u]));
            mt[at] = select(mt[at], mt[at] * f, vec4<u32>(c) + IOTA <= vec4<u32>(r));
        }
    }
}

// One block of four contraction rows s = 4 sb.. of a key tile (staged at slice rows 4 q..):
//     U += G_is k_s (s < i) + e_i A_si dw_s (s >= i),   Zc += G_si bm_s k_s (s > i).
fn key_block(u: ptr<function, array<vec4<f32>, 4>>, zc: ptr<function, array<vec4<f32>, 4>>, sb: u32, q: u32, tr: u32,
             tc: u32) {
    let kk = slice4(true, 4u * q, tc);
    if (sb <= tr) {
        var gl = rows4(4u * sb, tr);   // G_is at (s, i), above the diagonal
        if (sb == tr) {
            gl = band(gl, 1, 3);
        }
        mac4(u, gl, kk);
    }
    if (sb >= tr) {
        a_part(u, sb, q, tr, tc);
        var gr = rows4(4u * tr, sb);   // G_si at (i, s), over s for each row i
        if (sb == tr) {
            gr = band(gr, 1, 3);
        }
        let b = bm4[sb];
        for (var x = 0u; x < 4u; x++) {
            let f = gr[x] * b;
            (*zc)[x] += f.x * kk[0] + f.y * kk[1] + f.z * kk[2] + f.w * kk[3];
        }
    }
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let lc = local_chunk(wid);
    if (lc >= P.n_local) {
        return;
    }
    hv = wid.x;
    hk = hv / GROUP;
    ch = chunk_at(lc);
    hb = (lc * HV + hv) * CH;
    let q4 = CH / 4u;
    let nb = (ch.y + 3u) / 4u;   // blocks of four rows holding the chunk's rows

    // A into mt (lower triangle and diagonal; its zeros above), with phase 1's first slice in flight.
    let ha = a_rows(lc, hv);
    var av: array<vec4<f32>, 4>;
    for (var x = 0u; x < (CH * q4 + WG - 1u) / WG; x++) {
        av[x] = a[ha * q4 + min(lid + WG * x, CH * q4 - 1u)];
    }
    var nx = fetch_da(0u, lid);
    for (var x = 0u; x < (CH * q4 + WG - 1u) / WG; x++) {
        let e = lid + WG * x;
        if (e < CH * q4) {
            mt[mi(e / q4, e % q4)] = av[x];
        }
    }
    if (lid < CH) {
        let ok = lid < ch.y;
        let at = hb + min(lid, ch.y - 1u);
        gcs[lid] = select(0.0, gc[at], ok);
        bm4[lid / 4u][lid % 4u] = select(0.0, bm[at], ok);
    }

    // 1. dA = dw X^T + dvn Y^T (X, Y rows scaled while staged).
    let tb = tri_block(lid);
    let ti = tb.x;
    let tj = tb.y;
    let blk = ti < q4;     // the thread owns a block of the lower triangle (phases 1 - 3)
    let work = ti < nb;    // ... and its rows are not all past the chunk's end
    var acc: array<vec4<f32>, 4>;
    for (var s0 = 0u; s0 < K + V; s0 += BS) {
        workgroupBarrier();
        if (lid < 4u * CH) {
            let i = lid / 4u;
            let cg = 4u * (lid % 4u);
            var f = bm4[i / 4u][i % 4u];
            if (s0 < K) {
                f *= exp(gcs[i]);
            }
            for (var t = 0u; t < 4u; t++) {
                ls[(cg + t) * CP + i / 4u][i % 4u] = nx.y[t];
                rs[(cg + t) * CP + i / 4u][i % 4u] = f * nx.x[t];
            }
        }
        workgroupBarrier();
        if (s0 + BS < K + V) {
            nx = fetch_da(s0 + BS, lid);
        } else {
            nx = fetch_tile(0u, lid);
        }
        if (work) {
            for (var kk = 0u; kk < BS; kk++) {
                outer4(&acc, ls[kk * CP + ti], rs[kk * CP + tj]);
            }
        }
    }
    if (blk) {
        put_t(acc, ti, tj);   // dA^T above the diagonal
    }
    workgroupBarrier();

    // 2. T = dA A^T below the diagonal: T_rj = sum_b dA_rb A_jb, b < r, b <= j.
    var tt: array<vec4<f32>, 4>;
    if (work) {
        for (var bk = 0u; bk <= tj; bk++) {
            var l = rows4(4u * bk, ti);       // dA_rb at (b, r)
            var r = tr4(rows4(4u * tj, bk));  // A_jb at (j, b)
            if (bk == ti) {
                l = band(l, 1, 3);
            }
            if (bk == tj) {
                r = band(r, 0, 3);
            }
            mac4(&tt, l, r);
        }
    }
    workgroupBarrier();
    if (blk) {
        put_t(tt, ti, tj);
    }
    workgroupBarrier();

    // 3. G_ij = -sum_{r >= i} A_ri T_rj exp(gc_i - gc_j), j < i < len.
    var gg: array<vec4<f32>, 4>;
    if (work) {
        for (var rk = ti; rk < nb; rk++) {
            var l = rows4(4u * rk, ti);       // A_ri at (r, i)
            var r = tr4(rows4(4u * tj, rk));  // T_rj at (j, r)
            if (rk == ti) {
                l = band(l, -3, 0);
            }
            if (rk == tj) {
                r = band(r, -3, -1);
            }
            mac4(&gg, l, r);
        }
        for (var x = 0u; x < 4u; x++) {
            let i = 4u * ti + x;
            for (var c = 0u; c < 4u; c++) {
                let j = 4u * tj + c;
                gg[x][c] = select(0.0, -gg[x][c] * exp(gcs[i] - gcs[j]), j < i && i < ch.y);
            }
        }
    }
    workgroupBarrier();
    if (blk) {
        put_t(gg, ti, tj);
    }

    // 4. Column tiles, value tiles then key tiles; U doubles as dY in value tiles.
    let vt = (V + TW - 1u) / TW;
    let spt = CH / BS;
    let nz = (vt + (K + TW - 1u) / TW) * spt;
    let tc = lid % (TW / 4u);
    let tr = lid / (TW / 4u);
    let rows = tr < q4;
    var u: array<vec4<f32>, 4>;
    var zc: array<vec4<f32>, 4>;
    var own: array<vec4<f32>, 4>;   // k or v of the thread's rows and columns
    var s_u = vec4<f32>(0.0);       // per row: k.U, k.Zc, v.dY
    var s_zc = vec4<f32>(0.0);
    var s_y = vec4<f32>(0.0);
    for (var z = 0u; z < nz; z++) {
        let t = z / spt;
        let q0 = z % spt;
        let is_key = t >= vt;
        let d0 = select(t, t - vt, is_key) * TW;
        workgroupBarrier();
        ls[tr * CP + tc] = nx.x;   // slice row tr, vec4 column tc (as fetch_tile loaded it)
        rs[tr * CP + tc] = nx.y;
        if (z == vt * spt) {
            scale_a(lid);   // the value tiles are done with A
        }
        workgroupBarrier();
        if (z + 1u < nz) {
            nx = fetch_tile(z + 1u, lid);
        }
        if (rows) {
            if (q0 == 0u) {
                u = array<vec4<f32>, 4>();
                zc = array<vec4<f32>, 4>();
            }
            if (q0 == tr / 4u) {
                own = slice4(true, 4u * (tr % 4u), tc);
            }
            if (tr < nb) {
                for (var q = 0u; q < 4u; q++) {
                    let sb = 4u * q0 + q;
                    if (sb < nb) {
                        if (is_key) {
                            key_block(&u, &zc, sb, q, tr, tc);
                        } else if (sb >= tr) {
                            a_part(&u, sb, q, tr, tc);
                        }
                    }
                }
            }
            if (q0 + 1u == spt) {
                let col = d0 + 4u * tc;
                for (var x = 0u; x < 4u; x++) {
                    let i = 4u * tr + x;
                    let b = bm4[tr][x];
                    if (is_key) {
                        if (i < ch.y && col < K) {
                            let at = ((hb + i) * K + col) / 4u;
                            dkp[at] += b * u[x] + zc[x];
                        }
                        s_u[x] += dot(own[x], u[x]);
                        s_zc[x] += dot(own[x], zc[x]);
                    } else {
                        if (i < ch.y && col < V) {
                            dv[(((ch.x + i) * HV + hv) * V + col) / 4u] = b * u[x];
                        }
                        s_y[x] += dot(own[x], u[x]);
                    }
                }
            }
        }
    }

    // Row sums over the TW / 4 threads of each row, in order (mt is free now).
    workgroupBarrier();
    if (rows) {
        let at = 3u * lid;
        mt[at] = s_u;
        mt[at + 1u] = s_zc;
        mt[at + 2u] = s_y;
    }
    workgroupBarrier();
    if (lid < ch.y) {
        var t = vec3<f32>(0.0);
        for (var c = 0u; c < TW / 4u; c++) {
            let at = 3u * ((lid / 4u) * (TW / 4u) + c);
            t += vec3<f32>(mt[at][lid % 4u], mt[at + 1u][lid % 4u], mt[at + 2u][lid % 4u]);
        }
        let row = ch.x + lid;
        dbeta[row * HV + hv] = select(0.0, t.x + t.z, live(row));
        dgt[lid] = dgc[hb + lid] + bm4[lid / 4u][lid % 4u] * t.x - t.y;
    }
    workgroupBarrier();
    if (lid == 0u) {
        var acc_g = 0.0;
        for (var x = ch.y; x > 0u; x--) {
            let i = x - 1u;
            acc_g += dgt[i];
            let row = ch.x + i;
            let at = row * HV + hv;
            var d = acc_g;
            if (GATE_LINEAR) {
                d = acc_g / ld_g(at);
            }
            dg[at] = select(0.0, d, live(row));
        }
    }
}
