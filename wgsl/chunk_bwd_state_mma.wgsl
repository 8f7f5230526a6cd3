// chunk_bwd_state_mma.wgsl — the reverse walk of chunk_bwd_state.wgsl on cooperative matrices
// (tensor cores / simdgroup matrices). Same math, grid and outputs:
//     dh[lc] = dS
//     dvn   += (K ∘ fac) dS                                   [C x BV], fac_i = exp(gc_last - gc_i)
//     dS     = exp(gc_last) dS + (-w)^T dvn + Q^T (scale exp(gc) ∘ do)                 [K x BV]
// and at the end dS to `carry` (dh0 when the call has h0). Assembled after kernels::mma_header
// (MA, MB f16 operands; MC f32 accumulator; CT x CT tiles). Operands are f16 (K ∘ fac, -w, q, dS,
// dvn, scale exp(gc) ∘ do); products and dS accumulate in f32, so dS never loses precision from
// chunk to chunk. This is the precision of FLA's chunk_gated_delta_rule_bwd_dhu for f16/bf16
// inputs, and is used for those only (f32 inputs take chunk_bwd_state.wgsl).
// The f16 operands come ready from the recompute passes: -w and K ∘ fac from chunk_wu.wgsl (W16,
// `wk16` [L, HV, 2, C, K]), q from chunk_pack16.wgsl (plane 0 of `qk16` [L, H, 2, C, K]); rows past
// a chunk's end are 0 in both. Scaling do's rows (not q's) by scale exp(gc) keeps q a plain copy.
//
// One workgroup per (sequence, value head, BV value columns), MWG threads in subgroups taking
// CT x CT output tiles in rounds (as chunk_state_mma.wgsl). Per chunk, last to first:
//   1. dS (f32, workgroup) -> dh (global) and s16 (f16); K ∘ fac -> xs, dvn -> vs, the scaled do ->
//      rows C .. 2C of b16, all from registers loaded a step ahead.
//   2. dvn tiles: C = dvn, C += (K ∘ fac) dS; stored to vs.
//   3. dvn -> global and rows 0 .. C of b16; -w -> xs.
//   4. dS tiles: C = exp(gc_last) dS, C += (-w)^T dvn; stored to s32.
//   5. q -> xs, then the next (earlier) chunk's operands are loaded into registers (in flight
//      during step 6).
//   6. dS tiles: C = dS, C += Q^T (scale exp(gc) ∘ do); stored to s32.
// xs holds one C x K operand at a time so the arrays fit 48 KiB (42 KB at C = 64, K = 128, BV = 16).
// Every workgroup variable is a multiple of 16 bytes (a tile in workgroup memory must start 16-byte
// aligned and the driver lays variables out in any order: docs/PERF.md, R37). Rows of xs, s16 and
// b16 are padded by 8 halves so a tile's rows fall in different banks. In every round of tiles, all
// tiles are read before any is written (a subgroup with no tile left redoes the last one).
// Host-checked (ChunkSpec::for_backward): the forward walk's ChunkSpec::mma_fits (C * K <= 4 * 8 *
// MWG, MWG divides C * BV, C * BV / MWG <= 4, C, K, BV multiples of CT) and ChunkSpec::bwd_mma_bytes.

@group(0) @binding(2) var<storage, read> qk16: array<vec4<f16>>;
@group(0) @binding(3) var<storage, read> gc: array<f32>;
@group(0) @binding(4) var<storage, read> wk16: array<vec4<f16>>;
@group(0) @binding(5) var<storage, read> dout: array<u32>;
@group(0) @binding(6) var<storage, read> dht: array<u32>;
@group(0) @binding(7) var<storage, read_write> dvn: array<f32>;
@group(0) @binding(8) var<storage, read_write> dh: array<f32>;
@group(0) @binding(9) var<storage, read_write> carry: array<f32>;

override SB: u32 = BV + 8u;        // row stride of s16 and b16
// Workgroup array sizes, besides xs (chunk_mma_stage.wgsl); the host computes the same total,
// `ChunkSpec::bwd_mma_bytes`.
override SN: u32 = K * SB;
override BN: u32 = 2u * CH * SB;
override SSN: u32 = K * BV;
override VSN: u32 = CH * BV;
override NVR: u32 = CH * BV / MWG;          // dvn / do elements per thread (<= 4)

var<workgroup> s16: array<f16, SN>;    // [K][SB]: dS
var<workgroup> b16: array<f16, BN>;    // [2C][SB]: dvn, then scale exp(gc) ∘ do
var<workgroup> s32: array<f32, SSN>;   // [K][BV]: dS
var<workgroup> vs: array<f32, VSN>;    // [C][BV]: dvn
// (lo, hi, flag) of the sequence's chunks in this window, and the subgroup count.
var<workgroup> ctl: vec4<u32>;

fn ld_do(i: u32, row: u32) -> f32 { return select(0.0, decode(DO_DT, dout[word_of(DO_DT, i)], i), live(row)); }

// What a step reads from global memory, for one thread: its vectors of the chunk's K ∘ fac, -w
// and q, its share of dvn and of scale exp(gc) ∘ do, and gc_last.
struct Fetched {
    k: array<vec4<f16>, 8>,
    w: array<vec4<f16>, 8>,
    q: array<vec4<f16>, 8>,
    dv: array<f32, 4>,
    dq: array<f32, 4>,
    gl: f32,
}

// Loads chunk lc's share for thread lid (fixed trip counts: every load is issued before the
// first is waited for).
fn fetch(lc: u32, lid: u32, hv: u32, j0: u32, f: ptr<function, Fetched>) {
    let ch = chunk_at(lc);
    let hb = (lc * HV + hv) * CH;
    let pw = (lc * HV + hv) * 2u * NW4;
    let pq = (lc * H + hv / GROUP) * 2u * NW4;
    for (var x = 0u; x < NQ; x++) {
        let e = min(lid + MWG * x, NW4 - 1u); // (a clamped vector is loaded but not stored)
        (*f).w[x] = wk16[pw + e];
        (*f).k[x] = wk16[pw + NW4 + e];
        (*f).q[x] = qk16[pq + e];
    }
    for (var x = 0u; x < NVR; x++) {
        let e = lid + MWG * x;
        let i = e / BV;
        let c = j0 + e % BV;
        (*f).dv[x] = dvn[(hb + i) * V + c];
        var d = 0.0;
        if (i < ch.y) {
            d = P.scale * exp(gc[hb + i]) * ld_do(((ch.x + i) * HV + hv) * V + c, ch.x + i);
        }
        (*f).dq[x] = d;
    }
    (*f).gl = gc[hb + ch.y - 1u];
}

@compute @workgroup_size(MWG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
    @builtin(subgroup_id) sg: u32,
    @builtin(num_subgroups) nsg: u32,
) {
    // Not local_chunk(): naga treats a helper's result as non-uniform, and this return must be
    // uniform for the cooperative-matrix operations after it.
    let n = wid.y + wid.z * P.wg_per_row;
    if (n >= P.n_seqs) {
        return;
    }
    let tiles = V / BV;
    let hv = wid.x / tiles;
    let j0 = (wid.x % tiles) * BV;
    if (lid == 0u) {
        ctl = vec4<u32>(seq_range_of(n), nsg);
    }
    let cu = workgroupUniformLoad(&ctl);
    let r = cu.xyz;
    if ((r.x == r.y) & (r.z == 0u)) { // `&`: naga lowers `&&` through a non-uniform local
        return; // no chunk of this sequence in this window
    }
    let sbase = (n * HV + hv) * K * V;
    for (var e = lid; e < K * BV; e += MWG) {
        let x = start_ds(sbase + s_off(e / BV, j0 + e % BV), r);
        s32[e] = x;
    }

    let nsgu = cu.w;
    let ct = BV / CT;               // tile columns
    let nvt = (CH / CT) * ct;       // dvn tiles
    let nst = (K / CT) * ct;        // dS tiles
    let nvi = (nvt + nsgu - 1u) / nsgu;
    let nsi = (nst + nsgu - 1u) / nsgu;
    var nx: Fetched;
    if (r.y > r.x) {
        fetch(r.y - 1u, lid, hv, j0, &nx);
    }
    for (var t = r.y; t > r.x; t--) {
        let lc = t - 1u;
        workgroupBarrier(); // dS of the previous step is complete; xs, s16, b16 are free
        let hb = (lc * HV + hv) * CH;
        let gl = nx.gl;
        let dhb = (lc * HV + hv) * K * V + j0;
        for (var e = lid; e < K * BV; e += MWG) {
            let x = s32[e];
            dh[dhb + (e / BV) * V + e % BV] = x;
            s16[(e / BV) * SB + e % BV] = f16(x);
        }
        stage(nx.k, lid);
        for (var x = 0u; x < NVR; x++) {
            let e = lid + MWG * x;
            vs[e] = nx.dv[x];
            b16[(CH + e / BV) * SB + e % BV] = f16(nx.dq[x]);
        }
        workgroupBarrier();

        // 2. dvn += (K ∘ fac) dS
        for (var it = 0u; it < nvi; it++) {
            let tt = min(sg + it * nsgu, nvt - 1u);
            let i0 = (tt / ct) * CT;
            let c0 = (tt % ct) * CT;
            let vp = &vs[i0 * BV + c0];
            var acc = coopLoadT<MC>(vp, BV);
            for (var m0 = 0u; m0 < K; m0 += CT) {
                let ap = &xs[i0 * XK + m0];
                let bp = &s16[m0 * SB + c0];
                acc = coopMultiplyAdd(coopLoadT<MA>(ap, XK), coopLoadT<MB>(bp, SB), acc);
            }
            workgroupBarrier(); // every tile of this round is read before any is written
            coopStoreT(acc, vp, BV);
        }
        workgroupBarrier(); // dvn is complete in vs; every tile has read xs

        // 3. dvn out, and as the B operand of step 4.
        for (var x = 0u; x < NVR; x++) {
            let e = lid + MWG * x;
            let y = vs[e];
            dvn[(hb + e / BV) * V + j0 + e % BV] = y;
            b16[(e / BV) * SB + e % BV] = f16(y);
        }
        stage(nx.w, lid);
        workgroupBarrier();

        // 4. dS = exp(gc_last) dS + (-w)^T dvn; (-w)^T: element (m, i) at xs[i * XK + m], i.e.
        // column-major with stride XK.
        let dl = exp(gl);
        for (var it = 0u; it < nsi; it++) {
            let tt = min(sg + it * nsgu, nst - 1u);
            let m0 = (tt / ct) * CT;
            let c0 = (tt % ct) * CT;
            let sp = &s32[m0 * BV + c0];
            var acc = dl * coopLoadT<MC>(sp, BV);
            for (var i0 = 0u; i0 < CH; i0 += CT) {
                let ap = &xs[i0 * XK + m0];
                let bp = &b16[i0 * SB + c0];
                acc = coopMultiplyAdd(coopLoad<MA>(ap, XK), coopLoadT<MB>(bp, SB), acc);
            }
            workgroupBarrier(); // every tile of this round is read before any is written
            coopStoreT(acc, sp, BV);
        }
        workgroupBarrier(); // every tile has read xs

        // 5. q, then the earlier chunk's operands into registers.
        stage(nx.q, lid);
        workgroupBarrier();
        if (lc > r.x) {
            fetch(lc - 1u, lid, hv, j0, &nx);
        }

        // 6. dS += Q^T (scale exp(gc) ∘ do)
        for (var it = 0u; it < nsi; it++) {
            let tt = min(sg + it * nsgu, nst - 1u);
            let m0 = (tt / ct) * CT;
            let c0 = (tt % ct) * CT;
            let sp = &s32[m0 * BV + c0];
            var acc = coopLoadT<MC>(sp, BV);
            for (var i0 = 0u; i0 < CH; i0 += CT) {
                let ap = &xs[i0 * XK + m0];
                let bp = &b16[(CH + i0) * SB + c0];
                acc = coopMultiplyAdd(coopLoad<MA>(ap, XK), coopLoadT<MB>(bp, SB), acc);
            }
            workgroupBarrier(); // every tile of this round is read before any is written
            coopStoreT(acc, sp, BV);
        }
    }
    workgroupBarrier();
    for (var e = lid; e < K * BV; e += MWG) {
        carry[sbase + s_off(e / BV, j0 + e % BV)] = s32[e];
    }
}
