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
// Writes dv, dbeta, dg (the call's tensors) for the chunk's rows, and dkp. dm [L, HV, C, C] is
// scratch for dA A^T.
//
// Grid: (HV, local chunks on y/z). dA and G in workgroup memory; four threads per row i.

@group(0) @binding(2) var<storage, read> k: array<u32>;
@group(0) @binding(3) var<storage, read> v: array<u32>;
@group(0) @binding(4) var<storage, read> g: array<u32>;
@group(0) @binding(5) var<storage, read> gc: array<f32>;
@group(0) @binding(6) var<storage, read> bm: array<f32>;
@group(0) @binding(7) var<storage, read> a: array<f32>;
@group(0) @binding(8) var<storage, read> dw: array<f32>;
@group(0) @binding(9) var<storage, read> dvn: array<f32>;
@group(0) @binding(10) var<storage, read> dgc: array<f32>;
@group(0) @binding(11) var<storage, read_write> dkp: array<f32>;
@group(0) @binding(12) var<storage, read_write> dmt: array<f32>;
@group(0) @binding(13) var<storage, read_write> dv: array<f32>;
@group(0) @binding(14) var<storage, read_write> dbeta: array<f32>;
@group(0) @binding(15) var<storage, read_write> dg: array<f32>;

const PARTS: u32 = 4u;               // threads per row
var<workgroup> mt: array<f32, TILE>;  // dA, then G, [i][j] at i * C + j
var<workgroup> gcs: array<f32, 64>;
var<workgroup> bms: array<f32, 64>;
var<workgroup> red: array<f32, 1024>; // per thread: k.Z, k.Zc, k.dX, v.dY
var<workgroup> dgt: array<f32, 64>;

fn ld_k(i: u32) -> f32 { return decode(QKV_DT, k[word_of(QKV_DT, i)], i); }
fn ld_v(i: u32) -> f32 { return decode(QKV_DT, v[word_of(QKV_DT, i)], i); }
fn ld_g(i: u32) -> f32 { return decode(G_DT, g[word_of(G_DT, i)], i); }

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let lc = local_chunk(wid);
    if (lc >= P.n_local) {
        return;
    }
    let hv = wid.x;
    let hk = hv / GROUP;
    let ch = chunk_at(lc);
    let hb = (lc * HV + hv) * CH;
    if (lid < CH) {
        let ok = lid < ch.y;
        gcs[lid] = select(0.0, gc[hb + min(lid, ch.y - 1u)], ok);
        bms[lid] = select(0.0, bm[hb + min(lid, ch.y - 1u)], ok);
    }
    workgroupBarrier();
    // dA, strictly below the diagonal.
    for (var e = lid; e < CH * CH; e += WG) {
        let i = e / CH;
        let j = e % CH;
        var acc = 0.0;
        if (j < i && i < ch.y) {
            let ka = ((ch.x + j) * H + hk) * K;
            var ax = 0.0;
            for (var m = 0u; m < K; m++) {
                ax += dw[(hb + i) * K + m] * ld_k(ka + m);
            }
            let va = ((ch.x + j) * HV + hv) * V;
            var ay = 0.0;
            for (var c = 0u; c < V; c++) {
                ay += dvn[(hb + i) * V + c] * ld_v(va + c);
            }
            acc = bms[j] * (exp(gcs[j]) * ax + ay);
        }
        mt[e] = acc;
    }
    workgroupBarrier();
    // T = dA A^T, to scratch: T_rj = sum_{b < r, b <= j} dA_rb A_jb.
    for (var e = lid; e < CH * CH; e += WG) {
        let r = e / CH;
        let j = e % CH;
        var acc = 0.0;
        if (r < ch.y && j < ch.y) {
            for (var b = 0u; b < min(r, j + 1u); b++) {
                acc += mt[r * CH + b] * a[(hb + j) * CH + b];
            }
        }
        dmt[(hb + r) * CH + j] = acc;
    }
    storageBarrier();
    workgroupBarrier();
    // G_ij = -(A^T T)_ij exp(gc_i - gc_j), strictly below the diagonal.
    for (var e = lid; e < CH * CH; e += WG) {
        let i = e / CH;
        let j = e % CH;
        var acc = 0.0;
        if (j < i && i < ch.y) {
            for (var r = i; r < ch.y; r++) {
                acc -= a[(hb + r) * CH + i] * dmt[(hb + r) * CH + j];
            }
            acc *= exp(gcs[i] - gcs[j]);
        }
        mt[e] = acc;
    }
    workgroupBarrier();

    let i = lid / PARTS;
    let part = lid % PARTS;
    var s_z = 0.0;
    var s_zc = 0.0;
    var s_x = 0.0;
    var s_y = 0.0;
    if (i < ch.y) {
        let b_i = bms[i];
        let e_i = exp(gcs[i]);
        let ki = ((ch.x + i) * H + hk) * K;
        for (var m = part; m < K; m += PARTS) {
            var z = 0.0;
            var zc = 0.0;
            var dx = 0.0;
            for (var j = 0u; j < i; j++) {
                z += mt[i * CH + j] * ld_k(((ch.x + j) * H + hk) * K + m);
            }
            for (var r = i; r < ch.y; r++) {
                let kr = ld_k(((ch.x + r) * H + hk) * K + m);
                zc += mt[r * CH + i] * bms[r] * kr;
                dx += a[(hb + r) * CH + i] * dw[(hb + r) * K + m];
            }
            let at = (hb + i) * K + m;
            dkp[at] += b_i * z + zc + b_i * e_i * dx;
            let km = ld_k(ki + m);
            s_z += km * z;
            s_zc += km * zc;
            s_x += km * dx;
        }
        let vi = ((ch.x + i) * HV + hv) * V;
        for (var c = part; c < V; c += PARTS) {
            var dy = 0.0;
            for (var r = i; r < ch.y; r++) {
                dy += a[(hb + r) * CH + i] * dvn[(hb + r) * V + c];
            }
            dv[vi + c] = b_i * dy;
            s_y += ld_v(vi + c) * dy;
        }
    }
    red[4u * lid] = s_z;
    red[4u * lid + 1u] = s_zc;
    red[4u * lid + 2u] = s_x;
    red[4u * lid + 3u] = s_y;
    workgroupBarrier();
    if (lid < ch.y) {
        var t = vec4<f32>(0.0);
        for (var p = 0u; p < PARTS; p++) {
            let b = 4u * (lid * PARTS + p);
            t += vec4<f32>(red[b], red[b + 1u], red[b + 2u], red[b + 3u]);
        }
        let e_i = exp(gcs[lid]);
        let row = ch.x + lid;
        let at = row * HV + hv;
        dbeta[at] = select(0.0, e_i * t.z + t.w + t.x, live(row));
        dgt[lid] = dgc[hb + lid] + bms[lid] * (e_i * t.z + t.x) - t.y;
    }
    workgroupBarrier();
    if (lid == 0u) {
        var acc = 0.0;
        for (var x = ch.y; x > 0u; x--) {
            let i = x - 1u;
            acc += dgt[i];
            let row = ch.x + i;
            let at = row * HV + hv;
            var d = acc;
            if (GATE_LINEAR) {
                d = acc / ld_g(at);
            }
            dg[at] = select(0.0, d, live(row));
        }
    }
}
