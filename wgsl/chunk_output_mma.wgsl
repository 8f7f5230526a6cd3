// chunk_output_mma.wgsl — the output of chunk_output.wgsl on cooperative matrices:
//     o_i = scale * ( exp(gc_i) q_i S  +  sum_{j <= i} (q_i . k_j) exp(gc_i - gc_j) v_new_j )
// with S the state at the start of the chunk; rows i < len of the chunk only, a masked row writes 0.
// Assembled after kernels::mma_header (f16 operands MA, MB; f32 accumulator MC; CT x CT tiles).
// For f16/bf16 inputs, where the state walk runs on cooperative matrices too (OUT16).
//
// Operands come ready as f16 from the passes before (OUT16), q with QIN from the input. The tiles of
// k, S and v_new are loaded straight from global memory (a 16 x 16 tile is 16 rows of 32 bytes, and
// the tiles the workgroup's subgroups share stay in cache); q is staged with its rows scaled (step 2).
//   qk16 [L, H, QPL, C, K] q (chunk_pack16.wgsl; no q plane with QIN), then k^T as [K][C]
//                         (chunk_wu.wgsl); rows past the chunk's end 0
//   h16  [slots, HV, K, V] S (chunk_state_mma.wgsl, slot as h_base)
//   vn16 [L, HV, C, V]    v_new (chunk_state_mma.wgsl)
// Output o [rows, HV, V] f32. Every product accumulates in f32.
//
// Grid: (H * V / BVO, local chunks on y/z): a workgroup per key head, which makes the outputs of its
// GROUP value heads in turn; BVO is the whole V (ChunkSpec::for_forward). P = Q K^T depends on the
// key head only: with PKEEP each subgroup keeps its task of P in registers and stores it for each
// value head, so P is made once per chunk and key head. MWG threads in subgroups, which take tasks of
// a few CT x CT tiles (a row tile and two column tiles for P, 2 x 2 tiles for T, so loaded tiles feed
// two products each) in rounds; the round count is uniform (naga requires uniform control flow
// around cooperative-matrix operations), and a subgroup past the last task redoes the last one
// (same values written).
// Every workgroup variable is a multiple of 16 bytes (`ctl` packs the two words): the driver may lay
// them out in any order, and a cooperative-matrix tile in workgroup memory must start 16-byte
// aligned. With two loose u32 words p16 went wrong on the H100 (docs/PERF.md, R38).
// With QIN (an inference forward, PKEEP, the whole K staged at once) q comes from the input itself,
// staged once into qs for P, so no pack pass runs (docs/PERF.md, R78).
// Per value head:
//   1. P = Q K^T (C x C) -> pf (f32), kept from the first head with PKEEP.
//   2. p16 = f16(P ∘ Γ), Γ_ij = exp(gc_i - gc_j) for j <= i < len, else 0; and qs = f16(exp(gc) ∘ Q),
//      rows past len 0, in slices of QKS columns of K (the whole K where it fits).
//   3. T = qs S + p16 v_new (C x BVO), in the accumulators: the exp(gc) rows are in qs, so T needs no
//      round trip through workgroup memory to scale them (docs/PERF.md, R78: 0.90 -> 0.67 ms at B=1
//      T=16384, 3.60 -> 2.67 ms at B=8 T=8192).
//   4. For a whole chunk without a mask, o = scale * T straight from the accumulators. Otherwise each
//      subgroup parks one of its four tiles at a time in pf (a CT-row strip, a tile per subgroup),
//      and the workgroup copies the chunk's rows to o (rows past its end belong to the next chunk;
//      masked rows are 0).
// Host-checked (ChunkSpec::output_mma_fits): C and BVO multiples of 2 CT, K of QKS, QKS of CT; at
// most 16 subgroups (the parking strip); the arrays fit.

@group(0) @binding(4) var<storage, read> h16: array<f16>;
@group(0) @binding(5) var<storage, read> vn16: array<f16>;
@group(0) @binding(6) var<storage, read_write> o: array<f32>;
// qk16 again, as 4-half vectors: the q slices are staged 8 bytes a load (16-byte mat2x4<f16>
// loads made the state walk slower on the H100, docs/PERF.md R79, and are not used here untimed).
@group(0) @binding(7) var<storage, read> qk4: array<vec4<f16>>;
// With QIN, q itself (f16/bf16, [rows, H, K]) as words, 8 halves a load: staged here instead of by a
// pack pass.
@group(0) @binding(8) var<storage, read> qin: array<vec4<u32>>;

// pf (chunk_mma_qk.wgsl) holds P, then parked T tiles [CT][SK] (a tile per subgroup).
override FN: u32 = max(CH * CH, 16u * CT * CT);
override SK: u32 = FN / CT;                  // row stride of the parked tiles
override QSN: u32 = CH * QX;                 // qs (chunk_mma_qk.wgsl): [C][QX], one slice of K
override NQV: u32 = CH * QKS / 8u;           // 8-half pieces per slice
override NQT: u32 = (NQV + MWG - 1u) / MWG;  // of them per thread (<= 4)

// Stages columns m0 .. m0 + QKS of q into qs, times exp(gc) where `scaled`; rows past len 0. q: the
// plane at qb of qk16, or with QIN rows row0.. of key head hk of the input. gcs holds gc of the
// chunk's rows. All loads are issued before the first store (docs/PERF.md, R18); q from the input
// 16 bytes a load (R79).
fn stage_q(qb: u32, row0: u32, hk: u32, m0: u32, len: u32, lid: u32, scaled: bool) {
    var x: array<array<vec4<f32>, 2>, 4>;
    for (var n = 0u; n < NQT; n++) {
        let e = min(lid + MWG * n, NQV - 1u);
        let i = e * 8u / QKS;
        let m = m0 + (e * 8u) % QKS;
        if (QIN) {
            let w = qin[(((row0 + min(i, len - 1u)) * H + hk) * K + m) / 8u];
            x[n][0] = vec4<f32>(decode(QKV_DT, w.x, 0u), decode(QKV_DT, w.x, 1u), decode(QKV_DT, w.y, 0u), decode(QKV_DT, w.y, 1u));
            x[n][1] = vec4<f32>(decode(QKV_DT, w.z, 0u), decode(QKV_DT, w.z, 1u), decode(QKV_DT, w.w, 0u), decode(QKV_DT, w.w, 1u));
        } else {
            let at = (qb + i * K + m) / 4u;
            x[n][0] = vec4<f32>(qk4[at]);
            x[n][1] = vec4<f32>(qk4[at + 1u]);
        }
    }
    for (var n = 0u; n < NQT; n++) {
        let e = lid + MWG * n;
        if (e < NQV) {
            let i = e * 8u / QKS;
            let f = select(1.0, exp(gcs[i]), scaled);
            let at = i * QX + (e * 8u) % QKS;
            for (var hf = 0u; hf < 2u; hf++) {
                let y = vec4<f16>(select(vec4<f32>(0.0), x[n][hf] * f, i < len));
                qs[at + 4u * hf] = y.x;
                qs[at + 4u * hf + 1u] = y.y;
                qs[at + 4u * hf + 2u] = y.z;
                qs[at + 4u * hf + 3u] = y.w;
            }
        }
    }
}

// Writes tile q (0..3: t00, t01, t10, t11) of every subgroup's task of round `it` to o, through a
// strip of pf (a tile per subgroup): the chunk's rows only (ch: start row, len), masked rows 0.
// Uniform control flow: every subgroup calls it.
fn park(tile: MC, q: u32, sg: u32, nsgu: u32, it: u32, no: u32, lid: u32, ch: vec3<u32>, hv: u32, j0: u32) {
    let ot = BVO / (2u * CT);
    let pp = &pf[sg * CT];
    workgroupBarrier(); // pf is free: p16 is made, the previous tile is copied
    coopStoreT(tile, pp, SK);
    workgroupBarrier();
    for (var e = lid; e < CT * CT * nsgu; e += MWG) {
        let s = (e / CT) % nsgu; // the subgroup, and the element (ri, cj) of its tile
        let ri = e / (CT * nsgu);
        let cj = e % CT;
        let ts = min(s + it * nsgu, no - 1u);
        let i = (ts / ot) * 2u * CT + (q / 2u) * CT + ri;
        let c = (ts % ot) * 2u * CT + (q % 2u) * CT + cj;
        if (i < ch.y) {
            let row = ch.x + i;
            o[(row * HV + hv) * V + j0 + c] = select(0.0, P.scale * pf[ri * SK + s * CT + cj], live(row));
        }
    }
}

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
    let qb = (lc * H + hk) * QPL * CH * K; // q (not with QIN); k^T is the last plane
    let pt = CH / CT;

    // 1. P = Q K^T, once for the key head's GROUP value heads: with PKEEP (one task per subgroup)
    // each subgroup keeps its task's tiles and stores them for each head; otherwise every head makes
    // P again (qk_to_pf).
    let tp = min(sg, pt * (pt / 2u) - 1u);
    let pi0 = (tp / (pt / 2u)) * CT;
    let pc0 = (tp % (pt / 2u)) * 2u * CT;
    var p0: MC = coopLoadT<MC>(zp, CT);
    var p1: MC = coopLoadT<MC>(zp, CT);
    if (QIN) { // (host-checked: with PKEEP, the whole K in qs)
        stage_q(qb, ch.x, hk, 0u, ch.y, lid, false);
        workgroupBarrier();
    }
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

        // 3. T = qs S + p16 v_new, tasks of 2 x 2 tiles (two A and two B tiles feed four products).
        let ot = BVO / (2u * CT);
        let no = (pt / 2u) * ot;
        let ro = (no + nsgu - 1u) / nsgu;
        let nks = K / QKS;
        if (nks == 1u) { // the whole K at once, for every round
            stage_q(qb, ch.x, hk, 0u, ch.y, lid, true);
            workgroupBarrier(); // also: p16 is complete, pf is free
        }
        for (var it = 0u; it < ro; it++) {
            let t = min(sg + it * nsgu, no - 1u);
            let i0 = (t / ot) * 2u * CT;
            let c0 = (t % ot) * 2u * CT;
            var t00 = coopLoadT<MC>(zp, CT);
            var t01 = coopLoadT<MC>(zp, CT);
            var t10 = coopLoadT<MC>(zp, CT);
            var t11 = coopLoadT<MC>(zp, CT);
            for (var ks = 0u; ks < nks; ks++) {
                if (nks > 1u) {
                    workgroupBarrier(); // every subgroup is done with the previous slice
                    stage_q(qb, ch.x, hk, ks * QKS, ch.y, lid, true);
                    workgroupBarrier(); // also: p16 is complete, pf is free
                }
                // The next step's S tiles are loaded before this step's products (software
                // pipelining: a subgroup's loads from global memory overlap its products).
                let sk = sb + ks * QKS * V;
                var b0 = coopLoadT<MB>(&h16[sk + c0], V);
                var b1 = coopLoadT<MB>(&h16[sk + c0 + CT], V);
                for (var m0 = 0u; m0 < QKS; m0 += CT) {
                    let mn = min(m0 + CT, QKS - CT); // (the last step reloads its own tiles)
                    let nb0 = coopLoadT<MB>(&h16[sk + mn * V + c0], V);
                    let nb1 = coopLoadT<MB>(&h16[sk + mn * V + c0 + CT], V);
                    let a0 = coopLoadT<MA>(&qs[i0 * QX + m0], QX);
                    let a1 = coopLoadT<MA>(&qs[(i0 + CT) * QX + m0], QX);
                    t00 = coopMultiplyAdd(a0, b0, t00);
                    t01 = coopMultiplyAdd(a0, b1, t01);
                    t10 = coopMultiplyAdd(a1, b0, t10);
                    t11 = coopMultiplyAdd(a1, b1, t11);
                    b0 = nb0;
                    b1 = nb1;
                }
            }
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
                // 4. A whole chunk without a mask: every row is written, straight from the accumulators.
                let ob = ((ch.x + i0) * HV + hv) * V + j0 + c0;
                coopStoreT(P.scale * t00, &o[ob], HV * V);
                coopStoreT(P.scale * t01, &o[ob + CT], HV * V);
                coopStoreT(P.scale * t10, &o[ob + CT * HV * V], HV * V);
                coopStoreT(P.scale * t11, &o[ob + CT * HV * V + CT], HV * V);
            } else {
                // 4. Otherwise tile by tile through pf.
                park(t00, 0u, sg, nsgu, it, no, lid, ch, hv, j0);
                park(t01, 1u, sg, nsgu, it, no, lid, ch, hv, j0);
                park(t10, 2u, sg, nsgu, it, no, lid, ch, hv, j0);
                park(t11, 3u, sg, nsgu, it, no, lid, ch, hv, j0);
            }
        }
    }
}
