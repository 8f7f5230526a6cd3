// chunk_output_mma.wgsl — the output of chunk_output.wgsl on cooperative matrices:
//     o_i = scale * ( exp(gc_i) q_i S  +  sum_{j <= i} (q_i . k_j) exp(gc_i - gc_j) v_new_j )
// with S the state at the start of the chunk; rows i < len of the chunk only, a masked row writes 0.
// Assembled after kernels::mma_header (f16 operands MA, MB; f32 accumulator MC; CT x CT tiles).
// For f16/bf16 inputs, where the state walk runs on cooperative matrices too (OUT16).
//
// Operands come ready as f16 from the passes before (OUT16), and every tile is loaded straight from
// global memory, so nothing is staged: a 16 x 16 tile is 16 rows of 32 bytes, and the tiles the
// workgroup's subgroups share stay in cache.
//   qk16 [L, H, 2, C, K]  q (chunk_pack16.wgsl), then k^T as [K][C] (chunk_wu.wgsl); rows past the
//                         chunk's end 0
//   h16  [slots, HV, K, V] S (chunk_state_mma.wgsl, slot as h_base)
//   vn16 [L, HV, C, V]    v_new (chunk_state_mma.wgsl)
// Output o [rows, HV, V] f32. Every product accumulates in f32.
//
// Grid: (H * V / BVO, local chunks on y/z): a workgroup per key head, which makes the outputs of its
// GROUP value heads in turn; BVO is the whole V where the arrays fit (ChunkSpec::for_forward). P =
// Q K^T depends on the key head only: with PKEEP each subgroup keeps its task of P in registers and
// stores it for each value head, so P is made once per chunk and key head. MWG threads in
// subgroups, which take tasks of a few CT x CT tiles (a row tile and two column tiles for P, 2 x 2
// tiles for T, so loaded tiles feed two products each) in rounds; the round count is uniform (naga
// requires uniform control flow around cooperative-matrix operations), and a subgroup past the
// last task redoes the last one (same values written).
// Per value head:
// Every workgroup variable is a multiple of 16 bytes (`ctl` packs the two words): the driver may lay
// them out in any order, and a cooperative-matrix tile in workgroup memory must start 16-byte
// aligned. With two loose u32 words p16 went wrong on the H100 (docs/PERF.md, R38).
//   1. P = Q K^T (C x C) -> pf (f32), kept from the first head with PKEEP.
//   2. p16 = f16(P ∘ Γ), Γ_ij = exp(gc_i - gc_j) for j <= i < len, else 0.
//   3. T = Q S (C x BVO) -> pf; then row i of T times exp(gc_i).
//   4. T += p16 v_new: for a whole chunk without a mask, o = scale * T straight from the
//      accumulators; otherwise T -> pf, then
//   5. o = scale * T for the chunk's rows (0 where masked).
// Host-checked (ChunkSpec::output_mma_fits): C and BVO multiples of 2 CT, K of CT; the arrays fit.

@group(0) @binding(4) var<storage, read> h16: array<f16>;
@group(0) @binding(5) var<storage, read> vn16: array<f16>;
@group(0) @binding(6) var<storage, read_write> o: array<f32>;

// pf (chunk_mma_qk.wgsl) holds P, then T [C][BVO].
override FN: u32 = CH * max(CH, BVO);

@compute @workgroup_size(MWG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
    @builtin(subgroup_id) sg: u32,
    @builtin(num_subgroups) nsg: u32,
) {
    // Not local_chunk() or h_base(): naga treats a helper's result as non-uniform, and what the
    // cooperative-matrix operations depend on must be uniform (docs/PERF.md, R36).
    let lc = wid.y + wid.z * P.wg_per_row;
    if (lc >= P.n_local) {
        return;
    }
    let tiles = V / BVO;
    let hk = wid.x / tiles;
    let j0 = (wid.x % tiles) * BVO;
    let ch = chunk_at(lc);
    qk_prologue(lid, nsg, lc, lc * HV * CH, ch.y); // (gc of each head is loaded below)
    let cu = workgroupUniformLoad(&ctl); // also the barrier for zt
    let nsgu = cu.x;
    let sl = cu.y;
    let direct = (cu.z == CH) & !HAS_MASK; // uniform: step 4 stores o itself
    let zp = &zt[0];
    let qb = (lc * H + hk) * 2u * CH * K; // q; k follows at + C * K
    let pt = CH / CT;

    // 1. P = Q K^T, once for the key head's GROUP value heads: with PKEEP (one task per subgroup)
    // each subgroup keeps its task's tiles and stores them for each head; otherwise every head makes
    // P again (qk_to_pf).
    let tp = min(sg, pt * (pt / 2u) - 1u);
    let pi0 = (tp / (pt / 2u)) * CT;
    let pc0 = (tp % (pt / 2u)) * 2u * CT;
    var p0: MC = coopLoadT<MC>(zp, CT);
    var p1: MC = coopLoadT<MC>(zp, CT);
    if (PKEEP) {
        qk_task(qb, tp, &p0, &p1);
    }

    for (var g = 0u; g < GROUP; g++) {
        let hv = hk * GROUP + g;
        let hb = (lc * HV + hv) * CH;
        workgroupBarrier(); // the previous head is done with pf, p16 and gcs
        if (lid < CH) {
            gcs[lid] = select(0.0, gc[hb + lid], lid < ch.y);
        }
        let sb = (sl * HV + hv) * K * V + j0;
        let vb = hb * V + j0;

        // 2. P -> pf; p16 = f16(P ∘ Γ) (chunk_mma_qk.wgsl).
        if (PKEEP) {
            let s0 = &pf[pi0 * CH + pc0];
            let s1 = &pf[pi0 * CH + pc0 + CT];
            coopStoreT(p0, s0, CH);
            coopStoreT(p1, s1, CH);
            workgroupBarrier();
        } else {
            qk_to_pf(qb, sg, nsgu);
        }
        pf_to_p16(lid, ch.y, 1.0);
        workgroupBarrier(); // pf is free; nothing reads gc after this but the row scaling of step 3
        if (lid < CH) {
            gcs[lid] = exp(gcs[lid]); // one exponential per row, not one per element
        }

        // 3. T = Q S, then its rows scaled by exp(gc). Tasks: 2 x 2 tiles (two A and two B tiles feed
        // four products).
        let ot = BVO / (2u * CT);
        let no = (pt / 2u) * ot;
        let ro = (no + nsgu - 1u) / nsgu;
        for (var it = 0u; it < ro; it++) {
            let t = min(sg + it * nsgu, no - 1u);
            let i0 = (t / ot) * 2u * CT;
            let c0 = (t % ot) * 2u * CT;
            var t00 = coopLoadT<MC>(zp, CT);
            var t01 = coopLoadT<MC>(zp, CT);
            var t10 = coopLoadT<MC>(zp, CT);
            var t11 = coopLoadT<MC>(zp, CT);
            // The next step's tiles are loaded before this step's products (software pipelining: a
            // subgroup's loads from global memory overlap its products instead of preceding them).
            var a0 = coopLoadT<MA>(&qk16[qb + i0 * K], K);
            var a1 = coopLoadT<MA>(&qk16[qb + (i0 + CT) * K], K);
            var b0 = coopLoadT<MB>(&h16[sb + c0], V);
            var b1 = coopLoadT<MB>(&h16[sb + c0 + CT], V);
            for (var m0 = 0u; m0 < K; m0 += CT) {
                let mn = min(m0 + CT, K - CT); // (the last step reloads its own tiles)
                let na0 = coopLoadT<MA>(&qk16[qb + i0 * K + mn], K);
                let na1 = coopLoadT<MA>(&qk16[qb + (i0 + CT) * K + mn], K);
                let nb0 = coopLoadT<MB>(&h16[sb + mn * V + c0], V);
                let nb1 = coopLoadT<MB>(&h16[sb + mn * V + c0 + CT], V);
                t00 = coopMultiplyAdd(a0, b0, t00);
                t01 = coopMultiplyAdd(a0, b1, t01);
                t10 = coopMultiplyAdd(a1, b0, t10);
                t11 = coopMultiplyAdd(a1, b1, t11);
                a0 = na0;
                a1 = na1;
                b0 = nb0;
                b1 = nb1;
            }
            let d00 = &pf[i0 * BVO + c0];
            let d01 = &pf[i0 * BVO + c0 + CT];
            let d10 = &pf[(i0 + CT) * BVO + c0];
            let d11 = &pf[(i0 + CT) * BVO + c0 + CT];
            coopStoreT(t00, d00, BVO);
            coopStoreT(t01, d01, BVO);
            coopStoreT(t10, d10, BVO);
            coopStoreT(t11, d11, BVO);
        }
        workgroupBarrier();
        for (var e = lid; e < CH * BVO; e += MWG) {
            pf[e] *= gcs[e / BVO]; // exp(gc), above
        }
        workgroupBarrier();

        // 4. T += (P ∘ Γ) v_new, the same tasks.
        for (var it = 0u; it < ro; it++) {
            let t = min(sg + it * nsgu, no - 1u);
            let i0 = (t / ot) * 2u * CT;
            let c0 = (t % ot) * 2u * CT;
            let d00 = &pf[i0 * BVO + c0];
            let d01 = &pf[i0 * BVO + c0 + CT];
            let d10 = &pf[(i0 + CT) * BVO + c0];
            let d11 = &pf[(i0 + CT) * BVO + c0 + CT];
            var t00 = coopLoadT<MC>(d00, BVO);
            var t01 = coopLoadT<MC>(d01, BVO);
            var t10 = coopLoadT<MC>(d10, BVO);
            var t11 = coopLoadT<MC>(d11, BVO);
            var b0 = coopLoadT<MB>(&vn16[vb + c0], V);
            var b1 = coopLoadT<MB>(&vn16[vb + c0 + CT], V);
            for (var j = 0u; j < CH; j += CT) {
                let jn = min(j + CT, CH - CT);
                let nb0 = coopLoadT<MB>(&vn16[vb + jn * V + c0], V);
                let nb1 = coopLoadT<MB>(&vn16[vb + jn * V + c0 + CT], V);
                let a0 = coopLoadT<MA>(&p16[i0 * PS + j], PS);
                let a1 = coopLoadT<MA>(&p16[(i0 + CT) * PS + j], PS);
                t00 = coopMultiplyAdd(a0, b0, t00);
                t01 = coopMultiplyAdd(a0, b1, t01);
                t10 = coopMultiplyAdd(a1, b0, t10);
                t11 = coopMultiplyAdd(a1, b1, t11);
                b0 = nb0;
                b1 = nb1;
            }
            if (direct) {
                // 5. A whole chunk without a mask: every row is written, straight from the accumulators.
                let ob = ((ch.x + i0) * HV + hv) * V + j0 + c0;
                coopStoreT(P.scale * t00, &o[ob], HV * V);
                coopStoreT(P.scale * t01, &o[ob + CT], HV * V);
                coopStoreT(P.scale * t10, &o[ob + CT * HV * V], HV * V);
                coopStoreT(P.scale * t11, &o[ob + CT * HV * V + CT], HV * V);
            } else {
                workgroupBarrier(); // every tile of this round is read before any is written
                coopStoreT(t00, d00, BVO);
                coopStoreT(t01, d01, BVO);
                coopStoreT(t10, d10, BVO);
                coopStoreT(t11, d11, BVO);
            }
        }

        // 5. Otherwise the chunk's rows through pf: rows past its end belong to the next chunk, masked
        // rows are 0.
        if (!direct) {
            workgroupBarrier();
            for (var e = lid; e < CH * BVO; e += MWG) {
                let i = e / BVO;
                if (i < ch.y) {
                    let row = ch.x + i;
                    o[(row * HV + hv) * V + j0 + e % BVO] = select(0.0, P.scale * pf[e], live(row));
                }
            }
        }
    }
}
