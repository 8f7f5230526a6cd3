// chunk_qk.wgsl — shared by the two passes that build the chunk's causal
// P = scale exp(gc_i - gc_j) q_i . k_j and then take one product over K + C terms with it
// (chunk_output.wgsl, chunk_bwd_local.wgsl): the 4x4 blocks of Q K^T and of P, the slices and staging
// arrays, and the K + C product's staging and slice step; and their first bindings (q, k, gc at
// 2-4). Each pass defines its own fetch of the K + C product's slices.
//
// Q K^T (C x C): thread (ti, tj) owns rows ti*4 .. +4, columns tj*4 .. +4 (threads ti >= C/4 idle).
// K-slices of BS columns of q and k are staged transposed as vec4 over rows, rows padded by one
// vec4 (CP) so staging writes spread over banks; each slice's global reads are issued one slice
// ahead into registers (fixed counts, so they all fly at once).

@group(0) @binding(2) var<storage, read> q: array<u32>;
@group(0) @binding(3) var<storage, read> k: array<u32>;
@group(0) @binding(4) var<storage, read> gc: array<f32>;

fn ld_q(i: u32) -> f32 { return decode(QKV_DT, q[word_of(QKV_DT, i)], i); }
fn ld_k(i: u32) -> f32 { return decode(QKV_DT, k[word_of(QKV_DT, i)], i); }

const BS: u32 = 16u;   // contraction slice
const CP: u32 = 17u;   // vec4s per row of a transposed slice: C / 4 and BVO / 4 <= 16, plus one

var<workgroup> lq: array<vec4<f32>, 272>;   // left slice, [kk][i / 4] at kk * CP + i / 4
var<workgroup> rk: array<vec4<f32>, 272>;   // right slice, [kk][c / 4]
var<workgroup> gcs: array<f32, 64>;         // gc of the chunk's rows (0 past its end)
// The K + C product's left operand past K, kept whole: term t, rows r .. r + 4 at t * CP + r / 4
// (chunk_output: P^T, so the terms are P's columns; chunk_bwd_local: P, for P^T do).
var<workgroup> lp: array<vec4<f32>, 1088>;

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

// This thread's 4x4 block of the chunk's causal, decayed P: scale exp(gc_i - gc_j) q_i . k_j for
// j <= i < len, else 0 (zeros for threads ti >= C/4). Loads gcs first (gc of the chunk's rows, 0 past
// its end; hb: the chunk's first gc), which the barriers of qk_block publish for the pass too.
fn p_block(lid: u32, ch: vec3<u32>, hk: u32, hb: u32, scale: f32) -> array<vec4<f32>, 4> {
    if (lid < CH) {
        gcs[lid] = select(0.0, gc[hb + min(lid, ch.y - 1u)], lid < ch.y);
    }
    let pacc = qk_block(lid, ch, hk);
    let q4 = CH / 4u;
    let ti = lid / q4;
    let tj = lid % q4;
    var p: array<vec4<f32>, 4>;
    if (ti < q4) {
        for (var a = 0u; a < 4u; a++) {
            let i = ti * 4u + a;
            for (var b = 0u; b < 4u; b++) {
                let j = tj * 4u + b;
                if (j <= i && i < ch.y) {
                    p[a][b] = scale * pacc[a][b] * exp(gcs[i] - gcs[j]);
                }
            }
        }
    }
    return p;
}

// Stages slice s0 (BS terms) of a K + C product: below K this thread's share of the left slice
// (C rows, transposed like Q K^T's), and always its share of the right slice (BS x BVO).
fn stage_kc(f: Slice, s0: u32, lid: u32) {
    if (s0 < K) {
        for (var x = 0u; x < CH * BS / WG; x++) {
            let e = lid + WG * x;
            let i = e / BS;
            lq[(e % BS) * CP + i / 4u][i % 4u] = f.l[x];
        }
    }
    for (var x = 0u; x < BS * BVO / WG; x++) {
        let e = lid + WG * x;
        let c = e % BVO;
        rk[(e / BVO) * CP + c / 4u][c % 4u] = f.r[x];
    }
}

// acc += the staged slice s0 times this thread's block (rows tr*4 .. +4, columns tc*4 .. +4): the
// left operand from lq below K, from lp past it.
fn product_kc(acc: ptr<function, array<vec4<f32>, 4>>, s0: u32, tr: u32, tc: u32) {
    if (s0 < K) {
        for (var kk = 0u; kk < BS; kk++) {
            outer4(acc, lq[kk * CP + tr], rk[kk * CP + tc]);
        }
    } else {
        for (var kk = 0u; kk < BS; kk++) {
            outer4(acc, lp[(s0 - K + kk) * CP + tr], rk[kk * CP + tc]);
        }
    }
}
