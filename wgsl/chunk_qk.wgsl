// chunk_qk.wgsl — the chunk's query-key product, shared by the passes that need the causal
// P = scale exp(gc_i - gc_j) q_i . k_j (chunk_output.wgsl, chunk_bwd_local.wgsl): its slices, its
// staging arrays (reused by those passes for their own products afterwards) and the 4x4 blocks of
// Q K^T. Each pass binds q and k at 2 and 3 and defines ld_q, ld_k.
//
// Q K^T (C x C): thread (ti, tj) owns rows ti*4 .. +4, columns tj*4 .. +4 (threads ti >= C/4 idle).
// K-slices of BS columns of q and k are staged transposed as vec4 over rows, rows padded by one
// vec4 (CP) so staging writes spread over banks; each slice's global reads are issued one slice
// ahead into registers (fixed counts, so they all fly at once).

const BS: u32 = 16u;   // contraction slice
const CP: u32 = 17u;   // vec4s per row of a transposed slice: C / 4 and BVO / 4 <= 16, plus one

var<workgroup> lq: array<vec4<f32>, 272>;   // left slice, [kk][i / 4] at kk * CP + i / 4
var<workgroup> rk: array<vec4<f32>, 272>;   // right slice, [kk][c / 4]
var<workgroup> gcs: array<f32, 64>;         // gc of the chunk's rows (0 past its end)

// A thread's share of one slice: up to 4 left values (C x BS / WG) and 4 right values
// (C x BS / WG for k; BS x BVO / WG for the passes' own right operands).
struct Slice {
    l: array<f32, 4>,
    r: array<f32, 4>,
}

// Slice m0 of q and k for Q K^T (rows past the chunk's end 0).
fn fetch_qk(m0: u32, lid: u32, ch: vec3<u32>, hk: u32) -> Slice {
    var f: Slice;
    for (var x = 0u; x < CH * BS / WG; x++) {
        let e = lid + WG * x;
        let i = e / BS;
        let at = ((ch.x + min(i, ch.y - 1u)) * H + hk) * K + m0 + e % BS;
        f.l[x] = select(0.0, ld_q(at), i < ch.y);
        f.r[x] = select(0.0, ld_k(at), i < ch.y);
    }
    return f;
}

// This thread's 4x4 block of Q K^T for the chunk `ch` of key head hk (no decay, no scale, no mask).
fn qk_block(lid: u32, ch: vec3<u32>, hk: u32) -> array<vec4<f32>, 4> {
    let q4 = CH / 4u;
    let ti = lid / q4;
    let tj = lid % q4;
    var pacc: array<vec4<f32>, 4>;
    var nx = fetch_qk(0u, lid, ch, hk);
    for (var m0 = 0u; m0 < K; m0 += BS) {
        workgroupBarrier();
        for (var x = 0u; x < CH * BS / WG; x++) {
            let e = lid + WG * x;
            let i = e / BS;
            let kk = e % BS;
            lq[kk * CP + i / 4u][i % 4u] = nx.l[x];
            rk[kk * CP + i / 4u][i % 4u] = nx.r[x];
        }
        workgroupBarrier();
        if (m0 + BS < K) {
            nx = fetch_qk(m0 + BS, lid, ch, hk);
        }
        if (ti < q4) {
            for (var kk = 0u; kk < BS; kk++) {
                outer4(&pacc, lq[kk * CP + ti], rk[kk * CP + tj]);
            }
        }
    }
    return pacc;
}
