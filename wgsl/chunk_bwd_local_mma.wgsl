// chunk_bwd_local_mma.wgsl — chunk_bwd_local.wgsl on cooperative matrices. Same math, grid and
// outputs (vn, dvn [L, HV, C, V] f32, rows >= len 0):
//     v_new = u - w h                 h = saved state at the chunk's start, K x V
//     dvn   = P^T do                  P_ij = scale exp(gc_i - gc_j) q_i . k_j  (j <= i < len)
// Assembled after kernels::mma_header (f16 operands MA, MB; f32 accumulator MC; CT x CT tiles), for
// f16/bf16 inputs (the operands' precision is that of FLA's bwd for those inputs), where the
// recompute passes made the f16 operands: q and k^T in qk16 (chunk_pack16.wgsl; chunk_wu.wgsl with
// OUT16), -w in plane 0 of wk16 (chunk_wu.wgsl, W16). Products accumulate in f32.
//
// Grid (HV, local chunks on y/z); the whole V per workgroup, so P is made once per chunk and head.
// MWG threads in subgroups, which take tasks in rounds (uniform round counts; a subgroup past the
// last task redoes it, writing the same values), as in chunk_output_mma.wgsl:
//   1. P = Q K^T (C x C) -> pf (f32), a row tile and two column tiles per task.
//   2. p16 = f16(scale P ∘ Γ), 0 where j > i or i >= len; do -> x16 (f16; rows past len and masked
//      rows 0, as ld_do gives them).
//   3. dvn = p16^T x16: 2 x 2 output tiles per task (p16 read column-major), stored to global memory.
//   4. vn = u + (-w) h: accumulators start from u (global), h is staged into x16 as f16, CH rows at a
//      time; -w tiles come straight from global memory. Stored to global memory.
// Rows past len come out 0 without a select: P's rows and columns past len are 0, and so are the
// rows of u and -w there.
// Every workgroup variable is a multiple of 16 bytes (docs/PERF.md, R37).
// Host-checked (ChunkSpec::bwd_local_mma_fits): C and V multiples of 2 CT, K of CT; the arrays fit.

@group(0) @binding(4) var<storage, read> wk: array<f16>;
@group(0) @binding(5) var<storage, read> u: array<f32>;
@group(0) @binding(6) var<storage, read> ck: array<vec4<f32>>;
@group(0) @binding(7) var<storage, read> dout: array<u32>;
@group(0) @binding(8) var<storage, read_write> vn: array<f32>;
@group(0) @binding(9) var<storage, read_write> dvn: array<f32>;

// pf, p16, zt, gcs, ctl and qk16 (binding 2): chunk_mma_qk.wgsl.
override FN: u32 = CH * CH;
override QSN: u32 = 8u; // (qs of chunk_mma_qk.wgsl: not used here)
override XS: u32 = V + 8u;                 // row stride of x16
override XN: u32 = CH * XS;

var<workgroup> x16: array<f16, XN>;    // [C][XS]: do, then CH rows of h at a time

fn ld_do(i: u32, row: u32) -> f32 { return select(0.0, decode(DO_DT, dout[word_of(DO_DT, i)], i), live(row)); }

@compute @workgroup_size(MWG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
    @builtin(subgroup_id) sg: u32,
    @builtin(num_subgroups) nsg: u32,
) {
    // Not local_chunk() or h_base(): what the cooperative-matrix operations depend on must be
    // uniform, and naga treats a helper's result as non-uniform (docs/PERF.md, R36).
    let lc = wid.y + wid.z * P.wg_per_row;
    if (lc >= P.n_local) {
        return;
    }
    let hv = wid.x;
    let hk = hv / GROUP;
    let ch = chunk_at(lc);
    let hb = (lc * HV + hv) * CH;
    qk_prologue(lid, nsg, lc, hb, ch.y);
    let cu = workgroupUniformLoad(&ctl); // also the barrier for gcs and zt
    let nsgu = cu.x;
    let sb = (cu.y * HV + hv) * K * V; // the saved state (its window slice of ck)
    let zp = &zt[0];
    let qb = (lc * H + hk) * QPL * CH * K; // q (not with QIN); k^T is the last plane
    let wb = (lc * HV + hv) * 2u * CH * K; // -w (plane 0 of wk16)
    let pt = CH / CT;

    // 1, 2. P = Q K^T -> pf; p16 = f16(scale P ∘ Γ) (chunk_mma_qk.wgsl); do.
    qk_to_pf(qb, sg, nsgu);
    pf_to_p16(lid, ch.y, P.scale);
    for (var e = lid; e < CH * V; e += MWG) {
        let i = e / V;
        let row = ch.x + min(i, ch.y - 1u);
        x16[i * XS + e % V] = f16(select(0.0, ld_do((row * HV + hv) * V + e % V, row), i < ch.y));
    }
    workgroupBarrier();

    // 3. dvn = (P ∘ Γ)^T do: element (j, i) of the left operand is p16[i * PS + j], column-major.
    let ot = V / (2u * CT);
    let no = (pt / 2u) * ot;
    let ro = (no + nsgu - 1u) / nsgu;
    for (var it = 0u; it < ro; it++) {
        let t = min(sg + it * nsgu, no - 1u);
        let j0 = (t / ot) * 2u * CT;
        let c0 = (t % ot) * 2u * CT;
        var t00 = coopLoadT<MC>(zp, CT);
        var t01 = coopLoadT<MC>(zp, CT);
        var t10 = coopLoadT<MC>(zp, CT);
        var t11 = coopLoadT<MC>(zp, CT);
        for (var i0 = 0u; i0 < CH; i0 += CT) {
            let ap0 = &p16[i0 * PS + j0];
            let ap1 = &p16[i0 * PS + j0 + CT];
            let bp0 = &x16[i0 * XS + c0];
            let bp1 = &x16[i0 * XS + c0 + CT];
            let a0 = coopLoad<MA>(ap0, PS);
            let a1 = coopLoad<MA>(ap1, PS);
            let b0 = coopLoadT<MB>(bp0, XS);
            let b1 = coopLoadT<MB>(bp1, XS);
            t00 = coopMultiplyAdd(a0, b0, t00);
            t01 = coopMultiplyAdd(a0, b1, t01);
            t10 = coopMultiplyAdd(a1, b0, t10);
            t11 = coopMultiplyAdd(a1, b1, t11);
        }
        let d00 = &dvn[(hb + j0) * V + c0];
        let d01 = &dvn[(hb + j0) * V + c0 + CT];
        let d10 = &dvn[(hb + j0 + CT) * V + c0];
        let d11 = &dvn[(hb + j0 + CT) * V + c0 + CT];
        coopStoreT(t00, d00, V);
        coopStoreT(t01, d01, V);
        coopStoreT(t10, d10, V);
        coopStoreT(t11, d11, V);
    }

    // 4. vn = u + (-w) h, the same tasks; h through x16 in stages of CH rows.
    for (var it = 0u; it < ro; it++) {
        let t = min(sg + it * nsgu, no - 1u);
        let i0 = (t / ot) * 2u * CT;
        let c0 = (t % ot) * 2u * CT;
        let u00 = &u[(hb + i0) * V + c0];
        let u01 = &u[(hb + i0) * V + c0 + CT];
        let u10 = &u[(hb + i0 + CT) * V + c0];
        let u11 = &u[(hb + i0 + CT) * V + c0 + CT];
        var t00 = coopLoadT<MC>(u00, V);
        var t01 = coopLoadT<MC>(u01, V);
        var t10 = coopLoadT<MC>(u10, V);
        var t11 = coopLoadT<MC>(u11, V);
        for (var m1 = 0u; m1 < K; m1 += CH) {
            workgroupBarrier(); // every read of x16 (do, or the last stage of h) is done
            for (var e = lid; e < CH * V / 4u; e += MWG) {
                let r = e / (V / 4u);
                let c = 4u * (e % (V / 4u));
                if (m1 + r < K) {
                    let x = ck[(sb + (m1 + r) * V + c) / 4u];
                    x16[r * XS + c] = f16(x.x);
                    x16[r * XS + c + 1u] = f16(x.y);
                    x16[r * XS + c + 2u] = f16(x.z);
                    x16[r * XS + c + 3u] = f16(x.w);
                }
            }
            workgroupBarrier();
            for (var m0 = 0u; m0 < min(CH, K - m1); m0 += CT) {
                let ap0 = &wk[wb + i0 * K + m1 + m0];
                let ap1 = &wk[wb + (i0 + CT) * K + m1 + m0];
                let bp0 = &x16[m0 * XS + c0];
                let bp1 = &x16[m0 * XS + c0 + CT];
                let a0 = coopLoadT<MA>(ap0, K);
                let a1 = coopLoadT<MA>(ap1, K);
                let b0 = coopLoadT<MB>(bp0, XS);
                let b1 = coopLoadT<MB>(bp1, XS);
                t00 = coopMultiplyAdd(a0, b0, t00);
                t01 = coopMultiplyAdd(a0, b1, t01);
                t10 = coopMultiplyAdd(a1, b0, t10);
                t11 = coopMultiplyAdd(a1, b1, t11);
            }
        }
        let d00 = &vn[(hb + i0) * V + c0];
        let d01 = &vn[(hb + i0) * V + c0 + CT];
        let d10 = &vn[(hb + i0 + CT) * V + c0];
        let d11 = &vn[(hb + i0 + CT) * V + c0 + CT];
        coopStoreT(t00, d00, V);
        coopStoreT(t01, d01, V);
        coopStoreT(t10, d10, V);
        coopStoreT(t11, d11, V);
    }
}
