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
// Grid: (HV, local chunks on y/z). D (C x C) is built in workgroup memory; then four threads share
// each row i, thread p taking columns m = p, p + 4, ..., and their row sums are reduced at the end.

@group(0) @binding(2) var<storage, read> q: array<u32>;
@group(0) @binding(3) var<storage, read> k: array<u32>;
@group(0) @binding(4) var<storage, read> gc: array<f32>;
@group(0) @binding(5) var<storage, read> ck: array<f32>;
@group(0) @binding(6) var<storage, read> dh: array<f32>;
@group(0) @binding(7) var<storage, read> vn: array<f32>;
@group(0) @binding(8) var<storage, read> dvn: array<f32>;
@group(0) @binding(9) var<storage, read> dout: array<u32>;
@group(0) @binding(10) var<storage, read_write> dqp: array<f32>;
@group(0) @binding(11) var<storage, read_write> dkp: array<f32>;
@group(0) @binding(12) var<storage, read_write> dw: array<f32>;
@group(0) @binding(13) var<storage, read_write> dgc: array<f32>;

const PARTS: u32 = 4u;               // threads per row
var<workgroup> dm: array<f32, TILE>;  // D[i][j] at i * C + j
var<workgroup> gcs: array<f32, 64>;
var<workgroup> red: array<f32, 768>;  // per thread: q.dq - k.dk, k.dk_state, <dh, h> partial
var<workgroup> dgl: f32;

fn ld_q(i: u32) -> f32 { return decode(QKV_DT, q[word_of(QKV_DT, i)], i); }
fn ld_k(i: u32) -> f32 { return decode(QKV_DT, k[word_of(QKV_DT, i)], i); }
fn ld_do(i: u32, row: u32) -> f32 { return select(0.0, decode(DO_DT, dout[word_of(DO_DT, i)], i), live(row)); }

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
        gcs[lid] = select(0.0, gc[hb + min(lid, ch.y - 1u)], lid < ch.y);
    }
    workgroupBarrier();
    for (var e = lid; e < CH * CH; e += WG) {
        let i = e / CH;
        let j = e % CH;
        var acc = 0.0;
        if (j <= i && i < ch.y) {
            let da = ((ch.x + i) * HV + hv) * V;
            for (var c = 0u; c < V; c++) {
                acc += ld_do(da + c, ch.x + i) * vn[(hb + j) * V + c];
            }
            acc *= P.scale * exp(gcs[i] - gcs[j]);
        }
        dm[e] = acc;
    }
    workgroupBarrier();

    let hs = ck_base(lc, ch.z, hv);
    let dhb = (lc * HV + hv) * K * V;
    let gl = gcs[ch.y - 1u];
    let i = lid / PARTS;
    let part = lid % PARTS;
    var s_qk = 0.0;    // q_i . dq_i - k_i . dk_i (this thread's columns)
    var s_st = 0.0;    // k_i . (exp(gc_last - gc_i) dh v_new_i)
    if (i < CH) {
        let live_row = i < ch.y;
        let fq = P.scale * exp(gcs[i]);
        let fk = exp(gl - gcs[i]);
        let qa = ((ch.x + min(i, ch.y - 1u)) * H + hk) * K;
        let da = ((ch.x + min(i, ch.y - 1u)) * HV + hv) * V;
        for (var m = part; m < K; m += PARTS) {
            var dq = 0.0;
            var dk = 0.0;
            var dwm = 0.0;
            if (live_row) {
                var a_do = 0.0;
                var a_dv = 0.0;
                var a_vn = 0.0;
                for (var c = 0u; c < V; c++) {
                    let hmc = ck[hs + m * V + c];
                    a_do += ld_do(da + c, ch.x + i) * hmc;
                    a_dv += dvn[(hb + i) * V + c] * hmc;
                    a_vn += vn[(hb + i) * V + c] * dh[dhb + m * V + c];
                }
                let dk_st = fk * a_vn;
                dq = fq * a_do;
                dk = dk_st;
                for (var j = 0u; j < ch.y; j++) {
                    let kj = ((ch.x + j) * H + hk) * K + m;
                    dq += dm[i * CH + j] * ld_k(kj);
                    dk += dm[j * CH + i] * ld_q(kj);
                }
                dwm = -a_dv;
                let km = ld_k(qa + m);
                s_qk += ld_q(qa + m) * dq - km * dk;
                s_st += km * dk_st;
            }
            let at = (hb + i) * K + m;
            dqp[at] = dq;
            dkp[at] = dk;
            dw[at] = dwm;
        }
    }
    var s_hh = 0.0;
    for (var e = lid; e < K * V; e += WG) {
        s_hh += dh[dhb + e] * ck[hs + e];
    }
    red[lid] = s_qk;
    red[WG + lid] = s_st;
    red[2u * WG + lid] = s_hh;
    workgroupBarrier();
    if (lid == 0u) {
        var t = 0.0;
        for (var x = 0u; x < WG; x++) {
            t += red[WG + x] + exp(gl) * red[2u * WG + x];
        }
        dgl = t;
    }
    workgroupBarrier();
    if (lid < CH) {
        var d = 0.0;
        for (var p = 0u; p < PARTS; p++) {
            d += red[lid * PARTS + p];
        }
        d += select(0.0, dgl, lid == ch.y - 1u);
        dgc[hb + lid] = select(0.0, d, lid < ch.y);
    }
}
