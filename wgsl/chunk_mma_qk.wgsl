// chunk_mma_qk.wgsl — shared by chunk_output_mma.wgsl and chunk_bwd_local_mma.wgsl (after
// kernels::mma_header): the chunk's P = Q K^T on cooperative matrices and its scaled, decayed, causal
// f16 copy, and the workgroup arrays around them. Each kernel sizes pf (`FN`: at least C x C).
// Every workgroup variable is a multiple of 16 bytes (docs/PERF.md, R37).

@group(0) @binding(2) var<storage, read> qk16: array<f16>; // [L, H, QPL, C, K]: q, then k
@group(0) @binding(3) var<storage, read> gc: array<f32>;

const MWG: u32 = 256u;
override PS: u32 = CH + 8u;            // row stride of p16 (rows in different banks)
override PN: u32 = CH * PS;

override QX: u32 = QKS + 8u;           // row stride of qs
var<workgroup> pf: array<f32, FN>;     // [C][C]: P (the kernel may reuse it after p16 is made)
// [C][QX]: q staged by the output pass (QSN: its own size there, 16 bytes in the local pass).
var<workgroup> qs: array<f16, QSN>;
var<workgroup> p16: array<f16, PN>;    // [C][PS]: s P ∘ Γ
var<workgroup> zt: array<f32, 256>;    // zeros: the accumulators' starting tile
var<workgroup> gcs: array<f32, 64>;    // gc of the chunk's rows (0 past its end)
// (subgroup count, state slot, chunk length): one 16-byte variable, so that every workgroup variable is a multiple
// of 16 bytes and the f16 tiles start 16-byte aligned whatever order the driver lays them out in.
var<workgroup> ctl: vec4<u32>;

// The writes every workgroup starts with: gc of the chunk's rows (hb: its first row in gc, len its
// length), the zero tile, and ctl = (subgroup count, state slot of local chunk lc, len). The caller then
// reads ctl back with workgroupUniformLoad in its own entry point (also the barrier for the rest):
// naga treats a helper's result as non-uniform (docs/PERF.md, R36).
fn qk_prologue(lid: u32, nsg: u32, lc: u32, hb: u32, len: u32) {
    if (lid < CH) {
        gcs[lid] = select(0.0, gc[hb + lid], lid < len);
    }
    for (var e = lid; e < CT * CT; e += MWG) {
        zt[e] = 0.0;
    }
    if (lid == 0u) {
        ctl = vec4<u32>(nsg, info[P.slot_off + lc], len, 0u);
    }
}

// One task of P = Q K^T for the q plane at qb of qk16 (k^T, [K][C], its last plane): row tile and
// column-tile pair t, accumulated into p0, p1 (one A tile feeds two products). With QIN, q is the
// whole K staged in qs instead (the output pass of an inference forward, PKEEP only).
fn qk_task(qb: u32, t: u32, p0: ptr<function, MC>, p1: ptr<function, MC>) {
    let kb = qb + (QPL - 1u) * CH * K;
    let pt = CH / CT;
    let i0 = (t / (pt / 2u)) * CT;
    let c0 = (t % (pt / 2u)) * 2u * CT;
    // K^T: element (m, j) at kT[m * C + j], row-major (chunk_wu.wgsl writes it transposed: a
    // column-major load from global memory is slower). The next step's tiles are loaded before
    // this step's products (software pipelining).
    var a: MA;
    if (QIN) {
        a = coopLoadT<MA>(&qs[i0 * QX], QX);
    } else {
        a = coopLoadT<MA>(&qk16[qb + i0 * K], K);
    }
    var b0 = coopLoadT<MB>(&qk16[kb + c0], CH);
    var b1 = coopLoadT<MB>(&qk16[kb + c0 + CT], CH);
    for (var m0 = 0u; m0 < K; m0 += CT) {
        let mn = min(m0 + CT, K - CT); // (the last step reloads its own tiles)
        var na: MA;
        if (QIN) {
            na = coopLoadT<MA>(&qs[i0 * QX + mn], QX);
        } else {
            na = coopLoadT<MA>(&qk16[qb + i0 * K + mn], K);
        }
        let nb0 = coopLoadT<MB>(&qk16[kb + mn * CH + c0], CH);
        let nb1 = coopLoadT<MB>(&qk16[kb + mn * CH + c0 + CT], CH);
        *p0 = coopMultiplyAdd(a, b0, *p0);
        *p1 = coopMultiplyAdd(a, b1, *p1);
        a = na;
        b0 = nb0;
        b1 = nb1;
    }
}

// P = Q K^T -> pf, for the q plane at qb of qk16, task by task (qk_task) in rounds of the subgroups.
// zt must hold zeros; sg, nsgu uniform per subgroup.
fn qk_to_pf(qb: u32, sg: u32, nsgu: u32) {
    let pt = CH / CT;
    let np = pt * (pt / 2u);
    let rp = (np + nsgu - 1u) / nsgu;
    let zp = &zt[0];
    for (var it = 0u; it < rp; it++) {
        let t = min(sg + it * nsgu, np - 1u);
        var p0: MC = coopLoadT<MC>(zp, CT);
        var p1: MC = coopLoadT<MC>(zp, CT);
        qk_task(qb, t, &p0, &p1);
        let i0 = (t / (pt / 2u)) * CT;
        let c0 = (t % (pt / 2u)) * 2u * CT;
        let s0 = &pf[i0 * CH + c0];
        let s1 = &pf[i0 * CH + c0 + CT];
        coopStoreT(p0, s0, CH);
        coopStoreT(p1, s1, CH);
    }
    workgroupBarrier();
}

// p16 = f16(s P ∘ Γ), Γ_ij = exp(gc_i - gc_j) for j <= i < len, else 0 (min(j, i): no overflow in
// the branch the select drops). No barrier after it.
fn pf_to_p16(lid: u32, len: u32, s: f32) {
    for (var e = lid; e < CH * CH; e += MWG) {
        let i = e / CH;
        let j = e % CH;
        let keep = j <= i && i < len;
        p16[i * PS + j] = f16(select(0.0, s * pf[e] * exp(gcs[i] - gcs[min(j, i)]), keep));
    }
}
