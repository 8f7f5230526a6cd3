// chunk_bwd_state.wgsl — the reverse walk over chunks (FLA's chunk_gated_delta_rule_bwd_dhu).
//
// Per sequence n and value head hv, dS (K x V, f32; the gradient of the state at the end of the
// current chunk) starts from dht[n] (or 0, or the value carried from the window after this one) and
// for each of the sequence's chunks in this window, last to first:
//     dh[lc] = dS                                              (chunk_bwd_dqkwg reads it)
//     dvn_i += exp(gc_last - gc_i) k_i dS                      rows i < len
//     dS     = exp(gc_last) dS + sum_i (scale exp(gc_i) q_i) do_i^T - w_i^T dvn_i
// and at the end dS is written to `carry` in the call's layout (dh0 when the call has h0): the
// gradient of the state at the start of the window's first chunk.
// Grid: (HV * V / BV, sequences on y/z): sequential over chunks, parallel over sequences, heads and
// tiles of BV value columns; the K x BV tile of dS lives in workgroup memory.

@group(0) @binding(2) var<storage, read> q: array<u32>;
@group(0) @binding(3) var<storage, read> k: array<u32>;
@group(0) @binding(4) var<storage, read> gc: array<f32>;
@group(0) @binding(5) var<storage, read> w: array<f32>;
@group(0) @binding(6) var<storage, read> dout: array<u32>;
@group(0) @binding(7) var<storage, read> dht: array<u32>;
@group(0) @binding(8) var<storage, read_write> dvn: array<f32>;
@group(0) @binding(9) var<storage, read_write> dh: array<f32>;
@group(0) @binding(10) var<storage, read_write> carry: array<f32>;

var<workgroup> ds: array<f32, TILE>;     // dS[m][c] at m * BV + c (K * BV <= TILE, host-checked)
var<workgroup> dvt: array<f32, 1024>;    // the chunk's dvn[i][c] at i * BV + c (C * BV <= 1024)
var<workgroup> dos: array<f32, 1024>;    // the chunk's do[i][c] likewise
var<workgroup> gcs: array<f32, 64>;
var<workgroup> qf: array<f32, 64>;       // scale exp(gc_i), the chunk's query factors
var<workgroup> seq_range: vec3<u32>;

fn ld_q(i: u32) -> f32 { return decode(QKV_DT, q[word_of(QKV_DT, i)], i); }
fn ld_k(i: u32) -> f32 { return decode(QKV_DT, k[word_of(QKV_DT, i)], i); }
fn ld_do(i: u32, row: u32) -> f32 { return select(0.0, decode(DO_DT, dout[word_of(DO_DT, i)], i), live(row)); }

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let n = local_chunk(wid);
    if (n >= P.n_seqs) {
        return;
    }
    let tiles = V / BV;
    let hv = wid.x / tiles;
    let j0 = (wid.x % tiles) * BV;
    let hk = hv / GROUP;
    if (lid == 0u) {
        seq_range = seq_range_of(n);
    }
    let r = workgroupUniformLoad(&seq_range);
    if (r.x == r.y && r.z == 0u) {
        return; // no chunk of this sequence in this window
    }
    let sbase = (n * HV + hv) * K * V;
    for (var e = lid; e < K * BV; e += WG) {
        let at = sbase + s_off(e / BV, j0 + e % BV);
        var x = 0.0;
        if (r.z == 0u) {
            x = carry[at];
        } else if (HAS_DHT) {
            x = decode(DHT_DT, dht[word_of(DHT_DT, at)], at);
        }
        ds[e] = x;
    }
    for (var t = r.y; t > r.x; t--) {
        let lc = t - 1u;
        workgroupBarrier(); // dS (and dvt, dos, gcs) of the previous step are complete
        let ch = chunk_at(lc);
        let hb = (lc * HV + hv) * CH;
        if (lid < CH) {
            let x = select(0.0, gc[hb + min(lid, ch.y - 1u)], lid < ch.y);
            gcs[lid] = x;
            qf[lid] = P.scale * exp(x);
        }
        let dhb = (lc * HV + hv) * K * V + j0;
        for (var e = lid; e < K * BV; e += WG) {
            dh[dhb + (e / BV) * V + e % BV] = ds[e];
        }
        workgroupBarrier();
        let gl = gcs[ch.y - 1u];
        for (var e = lid; e < CH * BV; e += WG) {
            let i = e / BV;
            let c = e % BV;
            var x = 0.0;
            var d = 0.0;
            if (i < ch.y) {
                let ka = ((ch.x + i) * H + hk) * K;
                var acc = 0.0;
                for (var m = 0u; m < K; m++) {
                    acc += ld_k(ka + m) * ds[m * BV + c];
                }
                let at = (hb + i) * V + j0 + c;
                x = dvn[at] + exp(gl - gcs[i]) * acc;
                dvn[at] = x;
                d = ld_do(((ch.x + i) * HV + hv) * V + j0 + c, ch.x + i);
            }
            dvt[e] = x;
            dos[e] = d;
        }
        workgroupBarrier();
        let dl = exp(gl);
        for (var e = lid; e < K * BV; e += WG) {
            let m = e / BV;
            let c = e % BV;
            var acc = dl * ds[e];
            for (var i = 0u; i < ch.y; i++) {
                let qg = qf[i] * ld_q(((ch.x + i) * H + hk) * K + m);
                acc += qg * dos[i * BV + c] - w[(hb + i) * K + m] * dvt[i * BV + c];
            }
            ds[e] = acc; // each thread reads only its own entries of dS here
        }
    }
    workgroupBarrier();
    for (var e = lid; e < K * BV; e += WG) {
        carry[sbase + s_off(e / BV, j0 + e % BV)] = ds[e];
    }
}
