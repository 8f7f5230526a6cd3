// chunk_output.wgsl — the output (FLA's chunk_fwd_o).
//
// Per local chunk lc, value head hv (key head hk), rows i < len:
//     o_i = scale * ( exp(gc_i) q_i S  +  sum_{j <= i} (q_i . k_j) exp(gc_i - gc_j) v_new_j )
// with S = h[lc] the state at the start of the chunk; a masked row writes 0.
// Output o [rows, HV, V] (f32), rows of the chunk only.
//
// Grid: (HV * V / BVO, local chunks on y/z).
// Tiling: the causal, decay-masked P = Q K^T ∘ Γ (C x C) is built first (K-slices of q and k staged
// in workgroup memory, C*C/WG entries of P per thread in registers), then kept in workgroup memory.
// The output tile is one product over a contraction of K + C terms,
//     o[:, tile] = [exp(gc) ∘ Q | P] [S[:, tile] ; v_new[:, tile]]
// taken in slices of BS terms (left slice C x BS, right slice BS x BVO in workgroup memory); each
// thread accumulates TM rows x 4 columns of the tile in registers.

@group(0) @binding(2) var<storage, read> q: array<u32>;
@group(0) @binding(3) var<storage, read> k: array<u32>;
@group(0) @binding(4) var<storage, read> gc: array<f32>;
@group(0) @binding(5) var<storage, read> h: array<f32>;
@group(0) @binding(6) var<storage, read> vn: array<f32>;
@group(0) @binding(7) var<storage, read_write> o: array<f32>;

const BS: u32 = 16u;        // contraction slice
const SLICE: u32 = 1024u;   // C * BS and BS * BVO <= SLICE
const MAX_ACC: u32 = 16u;

var<workgroup> pm: array<f32, TILE>;   // P[i, j] at i * C + j
var<workgroup> ls: array<f32, SLICE>;  // left slice [i, kk] at i * BS + kk
var<workgroup> rs: array<f32, SLICE>;  // right slice [kk, c] at kk * BVO + c

fn ld_q(i: u32) -> f32 { return decode(QKV_DT, q[word_of(QKV_DT, i)], i); }
fn ld_k(i: u32) -> f32 { return decode(QKV_DT, k[word_of(QKV_DT, i)], i); }

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let lc = local_chunk(wid);
    if (lc >= P.n_local) {
        return;
    }
    let tiles = V / BVO;
    let hv = wid.x / tiles;
    let j0 = (wid.x % tiles) * BVO;
    let hk = hv / GROUP;
    let ch = chunk_at(lc);
    let hb = (lc * HV + hv) * C;

    // P = Q K^T over K-slices; q slice in ls, k slice in rs (both C x BS).
    let ne = (C * C) / WG;
    var pacc: array<f32, MAX_ACC>;
    for (var x = 0u; x < MAX_ACC; x++) {
        pacc[x] = 0.0;
    }
    for (var m0 = 0u; m0 < K; m0 += BS) {
        for (var e = lid; e < C * BS; e += WG) {
            let i = e / BS;
            var qv = 0.0;
            var kv = 0.0;
            if (i < ch.y) {
                let at = ((ch.x + i) * H + hk) * K + m0 + e % BS;
                qv = ld_q(at);
                kv = ld_k(at);
            }
            ls[e] = qv;
            rs[e] = kv;
        }
        workgroupBarrier();
        for (var x = 0u; x < ne; x++) {
            let e = lid + WG * x;
            let i = e / C;
            let j = e % C;
            var acc = pacc[x];
            for (var kk = 0u; kk < BS; kk++) {
                acc += ls[i * BS + kk] * rs[j * BS + kk];
            }
            pacc[x] = acc;
        }
        workgroupBarrier();
    }
    for (var x = 0u; x < ne; x++) {
        let e = lid + WG * x;
        let i = e / C;
        let j = e % C;
        var val = 0.0;
        if (j <= i && i < ch.y) {
            val = pacc[x] * exp(gc[hb + i] - gc[hb + j]);
        }
        pm[e] = val;
    }

    // Output tile: thread (tr, tc) owns rows tr*TM .. +TM, columns tc*4 .. +4.
    let tm = max(1u, (C * BVO) / (4u * WG));
    let tc = lid % (BVO / 4u);
    let tr = lid / (BVO / 4u);
    let in_tile = tr * tm < C;
    var acc: array<f32, MAX_ACC>;
    for (var x = 0u; x < MAX_ACC; x++) {
        acc[x] = 0.0;
    }
    let sb = (lc * HV + hv) * K * V + j0;
    for (var s0 = 0u; s0 < K + C; s0 += BS) {
        workgroupBarrier();
        if (s0 < K) {
            for (var e = lid; e < C * BS; e += WG) {
                let i = e / BS;
                var x = 0.0;
                if (i < ch.y) {
                    x = exp(gc[hb + i]) * ld_q(((ch.x + i) * H + hk) * K + s0 + e % BS);
                }
                ls[e] = x;
            }
            for (var e = lid; e < BS * BVO; e += WG) {
                rs[e] = h[sb + (s0 + e / BVO) * V + e % BVO];
            }
        } else {
            for (var e = lid; e < BS * BVO; e += WG) {
                rs[e] = vn[(hb + s0 - K + e / BVO) * V + j0 + e % BVO];
            }
        }
        workgroupBarrier();
        if (in_tile) {
            for (var kk = 0u; kk < BS; kk++) {
                let b = vec4<f32>(rs[kk * BVO + tc * 4u], rs[kk * BVO + tc * 4u + 1u], rs[kk * BVO + tc * 4u + 2u], rs[kk * BVO + tc * 4u + 3u]);
                for (var r = 0u; r < tm; r++) {
                    let i = tr * tm + r;
                    var av = 0.0;
                    if (s0 < K) {
                        av = ls[i * BS + kk];
                    } else {
                        av = pm[i * C + s0 - K + kk];
                    }
                    acc[4u * r] += av * b.x;
                    acc[4u * r + 1u] += av * b.y;
                    acc[4u * r + 2u] += av * b.z;
                    acc[4u * r + 3u] += av * b.w;
                }
            }
        }
    }
    if (in_tile) {
        for (var r = 0u; r < tm; r++) {
            let i = tr * tm + r;
            if (i < ch.y) {
                let row = ch.x + i;
                let live_row = live(row);
                for (var cc = 0u; cc < 4u; cc++) {
                    o[(row * HV + hv) * V + j0 + tc * 4u + cc] = select(0.0, P.scale * acc[4u * r + cc], live_row);
                }
            }
        }
    }
}
