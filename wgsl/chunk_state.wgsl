// chunk_state.wgsl — the chunk-to-chunk state walk (FLA's chunk_gated_delta_rule_fwd_h).
//
// Per sequence n and value head hv, S (K x V, f32) starts from h0[n] (or 0, or the state carried
// from the previous window) and for each of the sequence's chunks in this window, in order:
//     h[lc]  = S                                           (the output pass reads it)
//     v_new  = u - w S                                     [C x V], rows i >= len are 0
//     S      = exp(gc_last) S + (K ∘ exp(gc_last - gc))^T v_new
// and at the end the state is written to `state` (the carry between windows, and ht) in the
// call's layout. gc_last - gc_i <= 0, so every factor is at most 1.
// Outputs h [L, HV, K, V], vn [L, HV, C, V], state [N, HV, K, V] (kv) or [N, HV, V, K] (vk).
//
// Grid: (HV * V / BV, sequences on y/z): sequential over chunks, parallel over sequences, heads and
// tiles of BV value columns. The K x BV state tile and the chunk's C x BV v_new tile live in
// workgroup memory. v_new: thread (i, column group) computes 4 columns of row i (one w load per 4
// FMAs); the update: thread (row group, column group) owns RM rows x 4 columns of S in registers.

@group(0) @binding(2) var<storage, read> k: array<u32>;
@group(0) @binding(3) var<storage, read> gc: array<f32>;
@group(0) @binding(4) var<storage, read> w: array<f32>;
@group(0) @binding(5) var<storage, read> u: array<f32>;
@group(0) @binding(6) var<storage, read> h0: array<f32>;
@group(0) @binding(7) var<storage, read_write> h: array<f32>;
@group(0) @binding(8) var<storage, read_write> vn: array<f32>;
@group(0) @binding(9) var<storage, read_write> state: array<f32>;

var<workgroup> s: array<f32, TILE>;   // S[m, c] at m * BV + c
var<workgroup> vt: array<f32, 1024>;  // v_new[i, c] at i * BV + c (C * BV <= 1024, host-checked)
var<workgroup> fac: array<f32, 64>;   // exp(gc_last - gc_i)
var<workgroup> seq_range: vec3<u32>;

fn ld_k(i: u32) -> f32 { return decode(QKV_DT, k[word_of(QKV_DT, i)], i); }

// Offset of S[i][j] inside one K x V state in the call's layout.
fn s_off(i: u32, j: u32) -> u32 {
    return select(i * V + j, j * K + i, LAYOUT_VK);
}

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
        let b = P.seq_off + 3u * n;
        seq_range = vec3<u32>(info[b], info[b + 1u], info[b + 2u]);
    }
    let r = workgroupUniformLoad(&seq_range);
    if (r.x == r.y && r.z == 0u) {
        return; // no chunk of this sequence in this window
    }
    let sbase = (n * HV + hv) * K * V;
    for (var e = lid; e < K * BV; e += WG) {
        let src = sbase + s_off(e / BV, j0 + e % BV);
        var x = 0.0;
        if (r.z == 0u) {
            x = state[src];
        } else if (HAS_H0) {
            x = h0[src];
        }
        s[e] = x;
    }
    workgroupBarrier();

    for (var lc = r.x; lc < r.y; lc++) {
        let ch = chunk_at(lc);
        let hb = (lc * HV + hv) * C;
        let gl = gc[hb + ch.y - 1u];
        if (lid < C) {
            fac[lid] = select(0.0, exp(gl - gc[hb + lid]), lid < ch.y);
        }
        let hbase = (lc * HV + hv) * K * V + j0;
        for (var e = lid; e < K * BV; e += WG) {
            h[hbase + (e / BV) * V + e % BV] = s[e];
        }
        let cg = lid % (BV / 4u);
        let c4 = cg * 4u;
        let vi = lid / (BV / 4u);
        for (var i = vi; i < C; i += WG / (BV / 4u)) {
            var acc = vec4<f32>(0.0);
            if (i < ch.y) {
                let ub = (hb + i) * V + j0 + c4;
                acc = vec4<f32>(u[ub], u[ub + 1u], u[ub + 2u], u[ub + 3u]);
                let wb = (hb + i) * K;
                for (var m = 0u; m < K; m++) {
                    let sb = m * BV + c4;
                    acc -= w[wb + m] * vec4<f32>(s[sb], s[sb + 1u], s[sb + 2u], s[sb + 3u]);
                }
            }
            let vb = (hb + i) * V + j0 + c4;
            for (var cc = 0u; cc < 4u; cc++) {
                vt[i * BV + c4 + cc] = acc[cc];
                vn[vb + cc] = acc[cc];
            }
        }
        workgroupBarrier();
        let dl = exp(gl);
        // Thread owns rows m = rg * RM + r (r < RM), columns c4 .. c4 + 4.
        let rm = (K * (BV / 4u) + WG - 1u) / WG; // ceil(K / (WG / (BV / 4))) <= 4
        let kmax = K - 1u;
        let rg = lid / (BV / 4u);
        if (rg * rm < K) {
            var acc: array<vec4<f32>, 4>;
            for (var r = 0u; r < rm; r++) {
                let sb = min(rg * rm + r, kmax) * BV + c4;
                acc[r] = dl * vec4<f32>(s[sb], s[sb + 1u], s[sb + 2u], s[sb + 3u]);
            }
            for (var i = 0u; i < ch.y; i++) {
                let vb = i * BV + c4;
                let vv = fac[i] * vec4<f32>(vt[vb], vt[vb + 1u], vt[vb + 2u], vt[vb + 3u]);
                let kb = ((ch.x + i) * H + hk) * K + rg * rm;
                for (var r = 0u; r < rm; r++) {
                    acc[r] += ld_k(min(kb + r, kb + kmax - rg * rm)) * vv;
                }
            }
            for (var r = 0u; r < rm; r++) {
                let sb = (rg * rm + r) * BV + c4;
                if (rg * rm + r < K) {
                    for (var cc = 0u; cc < 4u; cc++) {
                        s[sb + cc] = acc[r][cc];
                    }
                }
            }
        }
        workgroupBarrier();
    }

    for (var e = lid; e < K * BV; e += WG) {
        state[sbase + s_off(e / BV, j0 + e % BV)] = s[e];
    }
}
