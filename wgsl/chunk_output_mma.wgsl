// chunk_output_mma.wgsl — the output of chunk_output.wgsl on cooperative matrices. Same math,
// bindings, grid and output:
//     o_i = scale * ( exp(gc_i) q_i S  +  sum_{j <= i} (q_i . k_j) exp(gc_i - gc_j) v_new_j )
// with S = h[lc]; rows i < len of the chunk only, a masked row writes 0.
// Assembled after kernels::mma_header (f16 operands MA, MB; f32 accumulator MC; CT x CT tiles).
// Operands are staged as f16 in workgroup memory (decoded and converted once per element); every
// product accumulates in f32. For f16/bf16 inputs only, as chunk_state_mma.wgsl.
//
// One workgroup per (value head, BVO value columns, local chunk), MWG threads in subgroups. Each
// subgroup owns a strip of CT rows and keeps the strip's 4 accumulator tiles in registers (NJ = C/CT
// and NT = BVO/CT are at most 4; past them the last tile is repeated, same values), so one A tile
// loaded feeds 4 products. With fewer subgroups than strips the strips go in rounds.
//   1. P = Q K^T  [C x C], over K in slices of KH (k staged transposed, so every load is row-major).
//   2. pm = f16(P ∘ Γ), Γ_ij = exp(gc_i - gc_j) for j <= i < len, else 0 (a select, so nothing past
//      the chunk's end leaks in).
//   3. T = (exp(gc) ∘ Q) S  [C x BVO], over K in slices (q scaled per row; S from h as f16).
//   4. T += pm v_new.
//   5. o = scale * T for the chunk's live rows.
// Rows of the f16 tiles are padded by 8 halves so a tile's rows fall in different banks.

@group(0) @binding(2) var<storage, read> q: array<u32>;
@group(0) @binding(3) var<storage, read> k: array<u32>;
@group(0) @binding(4) var<storage, read> gc: array<f32>;
@group(0) @binding(5) var<storage, read> h: array<f32>;
@group(0) @binding(6) var<storage, read> vn: array<f32>;
@group(0) @binding(7) var<storage, read_write> o: array<f32>;

const MWG: u32 = 128u;
override NJ: u32 = CH / CT;                  // P's tile columns (<= 4, host-checked)
override NT: u32 = BVO / CT;                 // T's tile columns (<= 4)
override QS: u32 = KH + 8u;                  // row stride of qa
override KTS: u32 = CH + 8u;                 // row stride of kb holding a k slice transposed
override BS: u32 = BVO + 8u;                 // row stride of kb holding S or v_new
override PS: u32 = CH + 8u;                  // row stride of pm
// Workgroup array sizes (the host computes the same total, `mma_output_bytes`).
override QAN: u32 = CH * QS;
override KBN: u32 = max(KH * KTS, max(KH, CH) * BS);
override PFN: u32 = CH * max(CH, BVO);
override PMN: u32 = CH * PS;

var<workgroup> qa: array<f16, QAN>;   // [C][QS]: a slice of q (scaled by exp(gc) in step 3)
var<workgroup> kb: array<f16, KBN>;   // [KH][KTS]: a k slice transposed; [KH][BS]: S; [C][BS]: v_new
var<workgroup> pf: array<f32, PFN>;   // [C][C]: P; then [C][BVO]: T
var<workgroup> pm: array<f16, PMN>;   // [C][PS]: P ∘ Γ
var<workgroup> zt: array<f32, 256>;   // zeros: the accumulators' starting tile
var<workgroup> gcs: array<f32, 64>;   // gc of the chunk's rows (0 past its end)
var<workgroup> sg_count: u32;

fn ld_q(i: u32) -> f32 { return decode(QKV_DT, q[word_of(QKV_DT, i)], i); }
fn ld_k(i: u32) -> f32 { return decode(QKV_DT, k[word_of(QKV_DT, i)], i); }

@compute @workgroup_size(MWG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
    @builtin(subgroup_id) sg: u32,
    @builtin(num_subgroups) nsg: u32,
) {
    // Not local_chunk(): naga treats a helper's result as non-uniform (see chunk_state_mma.wgsl).
    let lc = wid.y + wid.z * P.wg_per_row;
    if (lc >= P.n_local) {
        return;
    }
    let tiles = V / BVO;
    let hv = wid.x / tiles;
    let j0 = (wid.x % tiles) * BVO;
    let hk = hv / GROUP;
    let ch = chunk_at(lc);
    let hb = (lc * HV + hv) * CH;
    if (lid < CH) {
        gcs[lid] = select(0.0, gc[hb + lid], lid < ch.y);
    }
    for (var e = lid; e < 256u; e += MWG) {
        zt[e] = 0.0;
    }
    if (lid == 0u) {
        sg_count = nsg;
    }
    let nsgu = workgroupUniformLoad(&sg_count); // also the barrier for gcs and zt
    let strips = CH / CT;
    let rounds = (strips + nsgu - 1u) / nsgu;
    let qk0 = (ch.x * H + hk) * K;              // q/k offset of the chunk's first row
    let qk_row = H * K;
    let zp = &zt[0];
    // Tile column offsets of P (a) and of T (b); past the last column the last one again.
    let pa = vec4<u32>(0u, min(1u, NJ - 1u), min(2u, NJ - 1u), min(3u, NJ - 1u)) * CT;
    let pb = vec4<u32>(0u, min(1u, NT - 1u), min(2u, NT - 1u), min(3u, NT - 1u)) * CT;

    // 1. P = Q K^T, strip by strip.
    for (var it = 0u; it < rounds; it++) {
        let i0 = min(sg + it * nsgu, strips - 1u) * CT;
        var p0 = coopLoadT<MC>(zp, CT);
        var p1 = p0;
        var p2 = p0;
        var p3 = p0;
        for (var s0 = 0u; s0 < K; s0 += KH) {
            workgroupBarrier(); // the previous slice's products are done with qa and kb
            for (var e = lid; e < CH * KH; e += MWG) {
                let i = e / KH;
                let m = e % KH;
                var xq = 0.0;
                var xk = 0.0;
                if (i < ch.y) {
                    let at = qk0 + i * qk_row + s0 + m;
                    xq = ld_q(at);
                    xk = ld_k(at);
                }
                qa[i * QS + m] = f16(xq);
                kb[m * KTS + i] = f16(xk);
            }
            workgroupBarrier();
            for (var m0 = 0u; m0 < KH; m0 += CT) {
                let ap = &qa[i0 * QS + m0];
                let a = coopLoadT<MA>(ap, QS);
                let b0 = &kb[m0 * KTS + pa.x];
                let b1 = &kb[m0 * KTS + pa.y];
                let b2 = &kb[m0 * KTS + pa.z];
                let b3 = &kb[m0 * KTS + pa.w];
                p0 = coopMultiplyAdd(a, coopLoadT<MB>(b0, KTS), p0);
                p1 = coopMultiplyAdd(a, coopLoadT<MB>(b1, KTS), p1);
                p2 = coopMultiplyAdd(a, coopLoadT<MB>(b2, KTS), p2);
                p3 = coopMultiplyAdd(a, coopLoadT<MB>(b3, KTS), p3);
            }
        }
        let s0p = &pf[i0 * CH + pa.x];
        let s1p = &pf[i0 * CH + pa.y];
        let s2p = &pf[i0 * CH + pa.z];
        let s3p = &pf[i0 * CH + pa.w];
        coopStoreT(p0, s0p, CH);
        coopStoreT(p1, s1p, CH);
        coopStoreT(p2, s2p, CH);
        coopStoreT(p3, s3p, CH);
    }
    workgroupBarrier();

    // 2. Decay and causal mask.
    for (var e = lid; e < CH * CH; e += MWG) {
        let i = e / CH;
        let j = e % CH;
        let keep = j <= i && i < ch.y;
        pm[i * PS + j] = f16(select(0.0, pf[e] * exp(gcs[i] - gcs[min(j, i)]), keep));
    }

    // 3. and 4. T = (exp(gc) ∘ Q) S + pm v_new, strip by strip.
    let sb = (lc * HV + hv) * K * V + j0;
    for (var it = 0u; it < rounds; it++) {
        let i0 = min(sg + it * nsgu, strips - 1u) * CT;
        var t0 = coopLoadT<MC>(zp, CT);
        var t1 = t0;
        var t2 = t0;
        var t3 = t0;
        for (var s0 = 0u; s0 < K; s0 += KH) {
            workgroupBarrier(); // pm is complete; the previous products are done with qa and kb
            for (var e = lid; e < CH * KH; e += MWG) {
                let i = e / KH;
                let m = e % KH;
                var xq = 0.0;
                if (i < ch.y) {
                    xq = exp(gcs[i]) * ld_q(qk0 + i * qk_row + s0 + m);
                }
                qa[i * QS + m] = f16(xq);
            }
            for (var e = lid; e < KH * BVO; e += MWG) {
                let m = e / BVO;
                let c = e % BVO;
                kb[m * BS + c] = f16(h[sb + (s0 + m) * V + c]);
            }
            workgroupBarrier();
            for (var m0 = 0u; m0 < KH; m0 += CT) {
                let ap = &qa[i0 * QS + m0];
                let a = coopLoadT<MA>(ap, QS);
                let b0 = &kb[m0 * BS + pb.x];
                let b1 = &kb[m0 * BS + pb.y];
                let b2 = &kb[m0 * BS + pb.z];
                let b3 = &kb[m0 * BS + pb.w];
                t0 = coopMultiplyAdd(a, coopLoadT<MB>(b0, BS), t0);
                t1 = coopMultiplyAdd(a, coopLoadT<MB>(b1, BS), t1);
                t2 = coopMultiplyAdd(a, coopLoadT<MB>(b2, BS), t2);
                t3 = coopMultiplyAdd(a, coopLoadT<MB>(b3, BS), t3);
            }
        }
        // (Rows of v_new past the chunk's end are 0, and so are pm's columns there.)
        workgroupBarrier();
        for (var e = lid; e < CH * BVO; e += MWG) {
            let i = e / BVO;
            kb[i * BS + e % BVO] = f16(vn[(hb + i) * V + j0 + e % BVO]);
        }
        workgroupBarrier();
        for (var m0 = 0u; m0 < CH; m0 += CT) {
            let ap = &pm[i0 * PS + m0];
            let a = coopLoadT<MA>(ap, PS);
            let b0 = &kb[m0 * BS + pb.x];
            let b1 = &kb[m0 * BS + pb.y];
            let b2 = &kb[m0 * BS + pb.z];
            let b3 = &kb[m0 * BS + pb.w];
            t0 = coopMultiplyAdd(a, coopLoadT<MB>(b0, BS), t0);
            t1 = coopMultiplyAdd(a, coopLoadT<MB>(b1, BS), t1);
            t2 = coopMultiplyAdd(a, coopLoadT<MB>(b2, BS), t2);
            t3 = coopMultiplyAdd(a, coopLoadT<MB>(b3, BS), t3);
        }
        // pf held P until step 2's barrier; each strip writes only its own rows of T.
        let s0p = &pf[i0 * BVO + pb.x];
        let s1p = &pf[i0 * BVO + pb.y];
        let s2p = &pf[i0 * BVO + pb.z];
        let s3p = &pf[i0 * BVO + pb.w];
        coopStoreT(t0, s0p, BVO);
        coopStoreT(t1, s1p, BVO);
        coopStoreT(t2, s2p, BVO);
        coopStoreT(t3, s3p, BVO);
    }
    workgroupBarrier();

    // 5. The chunk's rows only.
    for (var e = lid; e < CH * BVO; e += MWG) {
        let i = e / BVO;
        if (i < ch.y) {
            let row = ch.x + i;
            o[(row * HV + hv) * V + j0 + e % BVO] = select(0.0, P.scale * pf[e], live(row));
        }
    }
}
