// chunk_output_mma.wgsl — the output of chunk_output.wgsl on cooperative matrices. Same math,
// bindings, grid and output:
//     o_i = scale * ( exp(gc_i) q_i S  +  sum_{j <= i} (q_i . k_j) exp(gc_i - gc_j) v_new_j )
// with S = h[lc]; rows i < len of the chunk only, a masked row writes 0.
// Assembled after kernels::mma_header (f16 operands MA, MB; f32 accumulator MC; CT x CT tiles).
// Operands are staged as f16 in workgroup memory (decoded and converted once per element); every
// product accumulates in f32. For f16/bf16 inputs only, as chunk_state_mma.wgsl.
//
// One workgroup per (value head, BVO value columns, local chunk), MWG threads in subgroups; the
// accumulators live in the f32 tile `pf` and subgroups take CT x CT tiles of it in rounds (as in
// chunk_state_mma.wgsl: uniform round counts, a subgroup with no tile left redoes the last one, and
// every round reads before it writes).
//   1. P = Q K^T  [C x C], over K in slices of KH columns (q and k slices staged per slice).
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
override QS: u32 = KH + 8u;                  // row stride of qa, and of kb holding a k slice
override BS: u32 = BVO + 8u;                 // row stride of kb holding S or v_new
override PS: u32 = CH + 8u;                  // row stride of pm
// Workgroup array sizes (the host computes the same total, `mma_output_bytes`).
override QAN: u32 = CH * QS;
override KBN: u32 = max(CH * QS, max(KH, CH) * BS);
override PFN: u32 = CH * max(CH, BVO);
override PMN: u32 = CH * PS;

var<workgroup> qa: array<f16, QAN>;   // [C][QS]: a slice of q (scaled by exp(gc) in step 3)
var<workgroup> kb: array<f16, KBN>;   // [C][QS]: a slice of k; then [KH][BS]: S; then [C][BS]: v_new
var<workgroup> pf: array<f32, PFN>;   // [C][C]: P; then [C][BVO]: T
var<workgroup> pm: array<f16, PMN>;   // [C][PS]: P ∘ Γ
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
    for (var e = lid; e < CH * CH; e += MWG) {
        pf[e] = 0.0;
    }
    if (lid == 0u) {
        sg_count = nsg;
    }
    let nsgu = workgroupUniformLoad(&sg_count); // also the barrier for gcs and pf
    let sc = CH / CT;                           // tile rows (and P's tile columns)
    let tc = BVO / CT;                          // T's tile columns
    let np = sc * sc;
    let nt = sc * tc;
    let rp = (np + nsgu - 1u) / nsgu;
    let rt = (nt + nsgu - 1u) / nsgu;
    let qk0 = (ch.x * H + hk) * K;              // q/k offset of the chunk's first row
    let qk_row = H * K;

    // 1. P = Q K^T.
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
            kb[i * QS + m] = f16(xk);
        }
        workgroupBarrier();
        for (var it = 0u; it < rp; it++) {
            let t = min(sg + it * nsgu, np - 1u);
            let i0 = (t / sc) * CT;
            let c0 = (t % sc) * CT;
            let pp = &pf[i0 * CH + c0];
            var acc = coopLoadT<MC>(pp, CH);
            for (var m0 = 0u; m0 < KH; m0 += CT) {
                // K^T: element (m, j) at kb[j * QS + m], i.e. column-major with stride QS.
                let ap = &qa[i0 * QS + m0];
                let bp = &kb[c0 * QS + m0];
                acc = coopMultiplyAdd(coopLoadT<MA>(ap, QS), coopLoad<MB>(bp, QS), acc);
            }
            workgroupBarrier(); // every tile of this round is read before any is written
            coopStoreT(acc, pp, CH);
        }
    }
    workgroupBarrier();

    // 2. Decay and causal mask.
    for (var e = lid; e < CH * CH; e += MWG) {
        let i = e / CH;
        let j = e % CH;
        let keep = j <= i && i < ch.y;
        pm[i * PS + j] = f16(select(0.0, pf[e] * exp(gcs[i] - gcs[min(j, i)]), keep));
    }
    workgroupBarrier();
    for (var e = lid; e < CH * BVO; e += MWG) {
        pf[e] = 0.0;
    }

    // 3. T = (exp(gc) ∘ Q) S.
    let sb = (lc * HV + hv) * K * V + j0;
    for (var s0 = 0u; s0 < K; s0 += KH) {
        workgroupBarrier();
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
        for (var it = 0u; it < rt; it++) {
            let t = min(sg + it * nsgu, nt - 1u);
            let i0 = (t / tc) * CT;
            let c0 = (t % tc) * CT;
            let tp = &pf[i0 * BVO + c0];
            var acc = coopLoadT<MC>(tp, BVO);
            for (var m0 = 0u; m0 < KH; m0 += CT) {
                let ap = &qa[i0 * QS + m0];
                let bp = &kb[m0 * BS + c0];
                acc = coopMultiplyAdd(coopLoadT<MA>(ap, QS), coopLoadT<MB>(bp, BS), acc);
            }
            workgroupBarrier();
            coopStoreT(acc, tp, BVO);
        }
    }

    // 4. T += pm v_new (rows of v_new past the chunk's end are 0, and so are pm's columns there).
    workgroupBarrier();
    for (var e = lid; e < CH * BVO; e += MWG) {
        let i = e / BVO;
        kb[i * BS + e % BVO] = f16(vn[(hb + i) * V + j0 + e % BVO]);
    }
    workgroupBarrier();
    for (var it = 0u; it < rt; it++) {
        let t = min(sg + it * nsgu, nt - 1u);
        let i0 = (t / tc) * CT;
        let c0 = (t % tc) * CT;
        let tp = &pf[i0 * BVO + c0];
        var acc = coopLoadT<MC>(tp, BVO);
        for (var m0 = 0u; m0 < CH; m0 += CT) {
            let ap = &pm[i0 * PS + m0];
            let bp = &kb[m0 * BS + c0];
            acc = coopMultiplyAdd(coopLoadT<MA>(ap, PS), coopLoadT<MB>(bp, BS), acc);
        }
        workgroupBarrier();
        coopStoreT(acc, tp, BVO);
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
