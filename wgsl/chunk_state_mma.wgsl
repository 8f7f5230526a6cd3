// chunk_state_mma.wgsl — the chunk-to-chunk state walk of chunk_state.wgsl, on cooperative matrices
// (tensor cores / simdgroup matrices). Same math, bindings (plus the f16 outputs h16, vn16 of OUT16),
// grid and outputs:
//     h[lc]  = S
//     v_new  = u - w S                                     [C x BV], rows i >= len are 0
//     S      = exp(gc_last) S + (K ∘ exp(gc_last - gc))^T v_new
// Assembled after a header (kernels::mma_header) that enables f16 and cooperative matrices and
// declares the tile types MA (f16, A), MB (f16, B), MC (f32, C) of CT x CT (16 on NVIDIA, 8 on
// Apple). Operands of the products are f16 (-w, S, K ∘ fac, v_new); products and S accumulate in
// f32, so the state itself never loses precision between chunks; this is the precision of FLA's
// kernel for f16/bf16 inputs and is used for those only (f32 inputs take chunk_state.wgsl).
// The f16 operands -w and K ∘ fac (fac_i = exp(gc_last - gc_i)) come ready from chunk_wu.wgsl (W16)
// (`wk16`), so a step only copies them: each thread moves a few 4-half vectors per operand,
// with no decoding, exponentials or conversions on the sequential path.
//
// One workgroup per (sequence, value head, BV value columns), MWG threads in subgroups; each
// subgroup takes CT x CT output tiles in turn. Per chunk:
//   1. S (f32, workgroup) -> h (global) and s16 (f16); -w -> xs and u -> vs from registers.
//   2. v_new tiles: C = u, C += (-w) S; stored to vs.
//   3. v_new -> vn (global) and s16 (f16); K ∘ fac -> xs from registers; then the next chunk's
//      operands are loaded into registers (the loads run during step 4), so no step waits on
//      global memory.
//   4. S tiles: C = exp(gc_last) S; C += (K ∘ fac)^T v_new; stored back.
// With U16 (u in f16 from chunk_wu.wgsl; the host sets it only where every v_new tile has its own
// subgroup, the adapter grants f16 accumulators and BV = 32 fits), step 2 accumulates v_new in f16
// (MH: v_new is an f16 operand and output anyway, and f16 keeps more bits than FLA's bf16 v_new)
// starting from u, and stores it from the accumulators into s16 (once every subgroup has read S)
// and vn16: no u staging, no f32 round trip, no conversion loop, one barrier less per chunk, and no
// vs, so BV = 32 fits in 48 KiB: half the workgroups, each reading a chunk's -w and K ∘ fac once
// for twice the columns (docs/PERF.md, R73).
// Rows of xs and s16 are padded by 8 halves (16 bytes) so a tile's rows fall in different banks.
// In steps 2 and 4 every round of tiles is read before any is written where a subgroup with no tile
// left repeats the last one (it must not see it half updated); step 4 takes two row tiles a task,
// so with 8 subgroups and 16 S tiles no subgroup repeats one and that barrier is skipped.
// Measured on the H100 (docs/PERF.md, R80): s32's padded rows, then the paired S tiles together
// with u's early load, walk 0.876 -> 0.83 -> 0.79 ms at B=1 T=16384; the early load without the
// pairs was slower (0.86 ms), the pairs without it no faster.
// Host-checked (ChunkSpec::mma_fits): C * K <= 4 * 8 * MWG and, without U16, MWG divides C * BV and
// C * BV / MWG <= 4.

@group(0) @binding(4) var<storage, read> wk: array<vec4<f16>>; // wk16 of chunk_common.wgsl
// With OUT16, S and v_new in f16 for chunk_output_mma.wgsl (f32 h only with KEEP_F32, vn with WV32).
@group(0) @binding(10) var<storage, read_write> h16: array<vec4<f16>>; // (V, BV, offsets: multiples of 4)
@group(0) @binding(11) var<storage, read_write> vn16: array<f16>;
// u as f16 (U16): the buffer of binding 5, which the host binds here as well.
@group(0) @binding(12) var<storage, read> u16: array<f16>;

override SB: u32 = BV + 8u;        // row stride of s16
// Row stride of s32, padded by 4 words: with BV = 32 every row began in bank 0, so each load and
// store of an f32 accumulator tile (8 rows an access) hit one bank 8 times over.
override SP: u32 = BV + 4u;
// Workgroup array sizes, besides xs (chunk_mma_stage.wgsl); the host computes the same total,
// `mma_workgroup_bytes`.
override SN: u32 = max(K, CH) * SB;
override SSN: u32 = K * SP;
override VSN: u32 = select(CH * BV, 4u, U16);
override NVR: u32 = select(CH * BV / MWG, 0u, U16); // u / v_new elements per thread (<= 4)

var<workgroup> s16: array<f16, SN>;    // [K][SB]: S, then [C][SB]: v_new (f16)
var<workgroup> s32: array<f32, SSN>;   // [K][SP]: S
var<workgroup> vs: array<f32, VSN>;    // [C][BV]: u, then v_new (not used with U16)
// (lo, hi, flag) of the sequence's chunks in this window, and the subgroup count: one 16-byte variable,
// so every workgroup variable is a multiple of 16 bytes and the f16 tiles start 16-byte aligned in
// whatever order the driver lays them out (chunk_output_mma.wgsl, docs/PERF.md R37).
var<workgroup> ctl: vec4<u32>;
// U16: a CT x CT zero tile, then the CT x CT identity (16 bytes without U16).
override IHN: u32 = select(8u, 2u * CT * CT, U16);
var<workgroup> ih: array<f16, IHN>;

// Where element e of S (row e / BV, column e % BV) sits in s32.
fn s32_at(e: u32) -> u32 {
    return (e / BV) * SP + e % BV;
}

// What a step reads from global memory, for one thread: its words of the chunk's -w and K ∘ fac,
// its share of u, and gc_last.
struct Fetched {
    w: array<vec4<f16>, 8>,
    k: array<vec4<f16>, 8>,
    u: array<f32, 4>,
    gl: f32,
}

// Loads chunk lc's share for thread lid (fixed trip counts: every load is issued before the
// first is waited for).
fn fetch(lc: u32, lid: u32, hv: u32, j0: u32, f: ptr<function, Fetched>) {
    let ch = chunk_at(lc);
    let hb = (lc * HV + hv) * CH;
    let pw = (lc * HV + hv) * 2u * NW4;
    for (var x = 0u; x < NQ; x++) {
        let e = min(lid + MWG * x, NW4 - 1u); // (a clamped vector is loaded but not stored)
        (*f).w[x] = wk[pw + e];
        (*f).k[x] = wk[pw + NW4 + e];
    }
    for (var x = 0u; x < NVR; x++) {
        let e = lid + MWG * x;
        (*f).u[x] = u[(hb + e / BV) * V + j0 + e % BV];
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
    for (var e = lid; e < IHN; e += MWG) {
        let d = e % (CT * CT);
        ih[e] = select(0.0h, 1.0h, e >= CT * CT && d / CT == d % CT);
    }
    for (var e = lid; e < K * BV; e += MWG) {
        s32[s32_at(e)] = start_state(sbase + s_off(e / BV, j0 + e % BV), r);
    }

    // Subgroup sg takes tiles sg, sg + nsg, ... in rounds; the round count must be uniform (naga
    // requires uniform control flow around cooperative-matrix operations), so the subgroup count is
    // read back uniformly (in `ctl`), and a subgroup past the last tile redoes the last one (same
    // inputs, same values written).
    let nsgu = cu.w;
    let ct = BV / CT;               // tile columns
    let nvt = (CH / CT) * ct;       // v_new tiles
    let rt = K / CT;                // row tiles of S
    let nsp = ((rt + 1u) / 2u) * ct; // S tasks: pairs of row tiles
    let nvi = (nvt + nsgu - 1u) / nsgu;
    let nsi = (nsp + nsgu - 1u) / nsgu;
    let dup = (nsp % nsgu != 0u) | (rt % 2u != 0u);
    // Registers for the next chunk, loaded one step ahead so their latency hides behind the
    // current chunk's last products.
    var nx: Fetched;
    fetch(r.x, lid, hv, j0, &nx);
    // U16: this subgroup's v_new tile (one round, host-checked).
    let tv = min(sg, nvt - 1u);
    let vi0 = (tv / ct) * CT;
    let vc0 = (tv % ct) * CT;
    for (var lc = r.x; lc < r.y; lc++) {
        let hb = (lc * HV + hv) * CH;
        // U16: this subgroup's u tile, its load issued before step 1 so that step 2 does not wait
        // on global memory.
        var ub: MB;
        if (U16) {
            let up = &u16[(hb + vi0) * V + j0 + vc0];
            ub = coopLoadT<MB>(up, V);
        }
        workgroupBarrier(); // S of the previous chunk is complete; xs and s16 are free
        let gl = nx.gl;
        let hbase = h_base(lc, hv) + j0;
        // Four adjacent columns a thread: one 8-byte store of h16 instead of four 2-byte ones.
        for (var e = 4u * lid; e < K * BV; e += 4u * MWG) {
            let e2 = s32_at(e);
            let x = vec4<f32>(s32[e2], s32[e2 + 1u], s32[e2 + 2u], s32[e2 + 3u]);
            let at = hbase + (e / BV) * V + e % BV;
            if (KEEP_F32) {
                h[at] = x.x;
                h[at + 1u] = x.y;
                h[at + 2u] = x.z;
                h[at + 3u] = x.w;
            }
            let y = vec4<f16>(x);
            let sp = (e / BV) * SB + e % BV;
            s16[sp] = y.x;
            s16[sp + 1u] = y.y;
            s16[sp + 2u] = y.z;
            s16[sp + 3u] = y.w;
            if (OUT16) {
                h16[at / 4u] = y;
            }
        }
        stage(nx.w, lid); // -w: rows past the chunk's end are 0
        for (var x = 0u; x < NVR; x++) {
            vs[lid + MWG * x] = nx.u[x];
        }
        workgroupBarrier();

        if (U16) {
            // v_new = I u + (-w) S: u enters as the B operand of a product with the identity. On the
            // H100 that beat loading u as the accumulator (f16 accumulator tiles load slowly from
            // global memory: walk 0.89 against 1.01 ms at B=1 T=16384), and a tile loaded one step
            // ahead in a variable carried across the loop was slower either way (docs/PERF.md, R73).
            let zp = &ih[0];
            let ip = &ih[CT * CT];
            var acc = coopMultiplyAdd(coopLoadT<MA>(ip, CT), ub, coopLoadT<MH>(zp, CT));
            for (var m0 = 0u; m0 < K; m0 += CT) {
                let ap = &xs[vi0 * XK + m0];
                let bp = &s16[m0 * SB + vc0];
                acc = coopMultiplyAdd(coopLoadT<MA>(ap, XK), coopLoadT<MB>(bp, SB), acc);
            }
            workgroupBarrier(); // every subgroup has read S and -w: v_new may overwrite s16
            let vp = &s16[vi0 * SB + vc0];
            coopStoreT(acc, vp, SB);
            if (OUT16) {
                let gp = &vn16[(hb + vi0) * V + j0 + vc0];
                coopStoreT(acc, gp, V);
            }
        } else {
            for (var it = 0u; it < nvi; it++) {
                let t = min(sg + it * nsgu, nvt - 1u);
                let i0 = (t / ct) * CT;
                let c0 = (t % ct) * CT;
                let up = &vs[i0 * BV + c0];
                var acc = coopLoadT<MC>(up, BV);
                for (var m0 = 0u; m0 < K; m0 += CT) {
                    let ap = &xs[i0 * XK + m0];
                    let bp = &s16[m0 * SB + c0];
                    acc = coopMultiplyAdd(coopLoadT<MA>(ap, XK), coopLoadT<MB>(bp, SB), acc);
                }
                workgroupBarrier(); // every tile of this round is read before any is written
                coopStoreT(acc, up, BV);
            }
            workgroupBarrier(); // v_new is complete in vs; every tile has read s16 and xs
        }

        for (var x = 0u; x < NVR; x++) {
            let e = lid + MWG * x;
            let x = vs[e];
            s16[(e / BV) * SB + e % BV] = f16(x);
            let at = (hb + e / BV) * V + j0 + e % BV;
            if (WV32) {
                vn[at] = x;
            }
            if (OUT16) {
                vn16[at] = f16(x);
            }
        }
        stage(nx.k, lid);
        workgroupBarrier();
        if (lc + 1u < r.y) {
            fetch(lc + 1u, lid, hv, j0, &nx);
        }

        // A task is two row tiles of S in one column tile: two independent chains of products that
        // share their v_new tiles. A barrier between reads and writes only where some subgroup
        // repeats another's tile (a subgroup past the last task, or an odd count of row tiles).
        let dl = exp(gl);
        for (var it = 0u; it < nsi; it++) {
            let t = min(sg + it * nsgu, nsp - 1u);
            let c0 = (t % ct) * CT;
            let ma = (t / ct) * 2u * CT;
            let mb = min(ma + CT, K - CT);
            let spa = &s32[ma * SP + c0];
            let spb = &s32[mb * SP + c0];
            var acca = dl * coopLoadT<MC>(spa, SP);
            var accb = dl * coopLoadT<MC>(spb, SP);
            for (var i0 = 0u; i0 < CH; i0 += CT) {
                // (K ∘ fac)^T: element (m, i) at xs[i * XK + m], i.e. column-major with stride XK.
                let apa = &xs[i0 * XK + ma];
                let apb = &xs[i0 * XK + mb];
                let bp = &s16[i0 * SB + c0];
                let b = coopLoadT<MB>(bp, SB);
                acca = coopMultiplyAdd(coopLoad<MA>(apa, XK), b, acca);
                accb = coopMultiplyAdd(coopLoad<MA>(apb, XK), b, accb);
            }
            if (dup) {
                workgroupBarrier(); // every tile of this round is read before any is written
            }
            coopStoreT(acca, spa, SP);
            coopStoreT(accb, spb, SP);
        }
    }
    workgroupBarrier();

    for (var e = lid; e < K * BV; e += MWG) {
        state[sbase + s_off(e / BV, j0 + e % BV)] = s32[s32_at(e)];
    }
}
