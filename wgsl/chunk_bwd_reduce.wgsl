// chunk_bwd_reduce.wgsl — dq and dk of a key head: the sum over its GROUP value heads, in order.
//
// Per local chunk lc and key head hk, rows i < len:
//     dq[row, hk] = sum_{g < GROUP} dqp[lc, hk * GROUP + g, i],   dk likewise from dkp
// A fixed order and no atomics: the result is bitwise repeatable.
// Grid: (H, local chunks on y/z).

@group(0) @binding(2) var<storage, read> dqp: array<f32>;
@group(0) @binding(3) var<storage, read> dkp: array<f32>;
@group(0) @binding(4) var<storage, read_write> dq: array<f32>;
@group(0) @binding(5) var<storage, read_write> dk: array<f32>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let lc = local_chunk(wid);
    if (lc >= P.n_local) {
        return;
    }
    let hk = wid.x;
    let ch = chunk_at(lc);
    for (var e = lid; e < ch.y * K; e += WG) {
        let i = e / K;
        let m = e % K;
        var sq = 0.0;
        var sk = 0.0;
        for (var x = 0u; x < GROUP; x++) {
            let at = ((lc * HV + hk * GROUP + x) * CH + i) * K + m;
            sq += dqp[at];
            sk += dkp[at];
        }
        let o = ((ch.x + i) * H + hk) * K + m;
        dq[o] = sq;
        dk[o] = sk;
    }
}
