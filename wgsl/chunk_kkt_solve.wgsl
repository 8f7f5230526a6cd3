// chunk_kkt_solve.wgsl — the chunk's gates, the in-chunk Gram product with its decay mask, and its
// unit-lower-triangular inverse (FLA's chunk_local_cumsum, chunk_scaled_dot_kkt and solve_tril, fused).
//
// Per local chunk lc and key head hk (one workgroup), for each of the GROUP value heads hv of hk, the
// gates (rows i < C):
//     gc[lc, hv, i] = sum_{i' <= i, i' < len, live} logdecay(g[start + i', hv])
//     bm[lc, hv, i] = beta[start + i, hv] if i < len and the token is live, else 0
// logdecay(x) = x for the log gate, log(max(x, 1e-30)) for the linear gate (a decay of 0 becomes a
// large negative log-decay, never -inf). A masked token is a step with decay 1 and beta 0 (SPEC 3):
// its key then never reaches the state or another token's output. Rows i >= len repeat the last gc
// and have bm = 0. Then the Gram matrix G = K K^T (C x C, over the chunk's keys) is computed once
// and shared by the GROUP value heads. For each of them:
//     N_ij = beta_i G_ij exp(gc_i - gc_j)      for j < i < len, else 0   (StrictLower, decay mask)
//     A    = (I + N)^-1                          unit lower triangular
// The exponent gc_i - gc_j <= 0 for j < i, so no factor overflows (strong decays underflow to 0).
// Outputs gc, bm [L, HV, C]; a [L, HV, C, C] (rows i >= len are e_i). With SOLVE = false (a backward,
// which reads the A its training forward saved) the gates only.
// The gates were a pass of their own before (a thread per chunk and value head). Here threads C .. 2C
// make them: the first head's after the Gram product (from loads issued before it), each next head's
// while the diagonal blocks of the one before are solved, where those threads are idle (docs/PERF.md,
// R79).
//
// Grid: (H, local chunks on y/z).
// G: thread (ti, tj) owns a 4x4 block in registers; K-slices of BS columns are staged transposed
// in workgroup memory as vec4 over rows, each slice's global reads issued one slice ahead into
// registers with fixed counts (the staging rule of docs/PERF.md), so no slice waits on memory.
// The inverse is blocked by NB = 16 rows, so that no step is a long sequential chain:
//   1. each diagonal block's inverse, one thread per (block, column) solving that column by forward
//      substitution in registers, right-looking (a dependent chain of NB steps): no barriers
//      inside (a row-by-row substitution over all C rows took two barriers per row);
//   2. block row p = 1 .. C/NB - 1 in turn:  A_pq = -A_pp sum_{q <= r < p} N_pr A_rq  (q < p),
//      all q and entries at once, first the sums (into tb4), then the products with A_pp; each
//      thread takes 4 adjacent entries of a row, so a term costs one scalar and one vec4 read of
//      workgroup memory per 4 FMAs (one entry per thread took two reads per FMA: 0.22 against
//      0.14 ms per window on the H100).
// N is overwritten by A in place: step 2 for block row p reads N from row p and A from rows < p.

@group(0) @binding(2) var<storage, read> k: array<u32>;
@group(0) @binding(3) var<storage, read_write> gc: array<f32>;
@group(0) @binding(4) var<storage, read_write> bm: array<f32>;
@group(0) @binding(5) var<storage, read_write> a: array<vec4<f32>>;
@group(0) @binding(6) var<storage, read> g: array<u32>;
@group(0) @binding(7) var<storage, read> beta: array<u32>;

// The Gram product and the inverse; false: the gates only (set per dispatch, not by ChunkSpec).
override SOLVE: bool = true;

const BS: u32 = 16u;   // K slice of the Gram product
const CP: u32 = 17u;   // vec4s per row of the transposed slice: C / 4 <= 16, plus one
const NB: u32 = 16u;   // block size of the inverse
// Row stride of N/A in workgroup memory, in vec4s: 64 / 4 + 1 puts rows i and i + 1 four banks
// apart (step 2 reads eight rows per subgroup) and keeps blocks b and b + 1 of step 1 sixteen
// banks apart.
const NS4: u32 = 17u;

// Key slice, [m][i / 4] at m * CP + i / 4. In the solve it holds step 2's sums instead (tb4:
// (C / NB - 1) blocks of NB x NB <= 192 vec4s), which keeps the pass within 22 KiB.
var<workgroup> ks: array<vec4<f32>, BS * CP>;
var<workgroup> na: array<vec4<f32>, 1088>;  // N, then A: row i at i * NS4 (C x 4 NS4 floats, C <= 64)
// One value head's gates: its log-decays (0 past len and where masked), gc and bm, four rows a vector.
var<workgroup> lg: array<vec4<f32>, 16>;
var<workgroup> hg: array<vec4<f32>, 16>;
var<workgroup> hm: array<vec4<f32>, 16>;

// Element (i, j) of N/A.
fn na_at(i: u32, j: u32) -> f32 {
    return na[i * NS4 + j / 4u][j % 4u];
}

// Elements i and i + 1 of k (i even): one word for f16/bf16 (half the load instructions).
fn ld_k2(i: u32) -> vec2<f32> {
    if (QKV_DT == DT_F32) {
        return vec2<f32>(bitcast<f32>(k[i]), bitcast<f32>(k[i + 1u]));
    }
    let w = k[i >> 1u];
    return vec2<f32>(decode(QKV_DT, w, i), decode(QKV_DT, w, i + 1u));
}

// A thread's share of K-slice m0: C x BS / (2 WG) <= BS / 8 pairs of adjacent columns (rows past
// the chunk's end 0).
fn fetch_k(m0: u32, lid: u32, ch: vec3<u32>, hk: u32) -> array<vec2<f32>, BS / 8u> {
    var f: array<vec2<f32>, BS / 8u>;
    for (var x = 0u; x < (CH * BS / 2u + WG - 1u) / WG; x++) {
        // C = 16 has fewer pairs than threads: the surplus threads load the last pair again and
        // store the same values, which keeps the count fixed and the loop free of branches.
        let e = min(lid + WG * x, CH * BS / 2u - 1u);
        let i = e / (BS / 2u);
        let at = ((ch.x + min(i, ch.y - 1u)) * H + hk) * K + m0 + 2u * (e % (BS / 2u));
        f[x] = select(vec2<f32>(0.0), ld_k2(at), i < ch.y);
    }
    return f;
}

fn ld_g(i: u32) -> f32 { return decode(G_DT, g[word_of(G_DT, i)], i); }
fn ld_beta(i: u32) -> f32 { return decode(BETA_DT, beta[word_of(BETA_DT, i)], i); }

fn log_decay(x: f32) -> f32 {
    if (GATE_LINEAR) {
        return log(max(x, 1e-30));
    }
    return x;
}

// (log-decay, beta) of row i of chunk ch for value head hv: 0 past len and where masked.
fn gate_raw(hv: u32, i: u32, ch: vec3<u32>) -> vec2<f32> {
    let row = ch.x + min(i, ch.y - 1u);
    let ok = i < ch.y && live(row);
    let x = vec2<f32>(log_decay(ld_g(row * HV + hv)), ld_beta(row * HV + hv));
    return select(vec2<f32>(0.0), x, ok);
}

// gc and bm of value head hv from its raw gates (gate thread i < C holds row i's in `raw`): into gc, bm
// and the workgroup's hg, hm. gc_i sums whole vectors of lg, then the first i % 4 + 1 entries of its
// own. The caller has made lg visible (a barrier after writing it).
fn gates_out(raw: vec2<f32>, i: u32, lc: u32, hv: u32) {
    var s = vec4<f32>(0.0);
    for (var q = 0u; q < i / 4u; q++) {
        s += lg[q];
    }
    let l = lg[i / 4u];
    let r = i % 4u;
    let own = l.x + select(0.0, l.y, r >= 1u) + select(0.0, l.z, r >= 2u) + select(0.0, l.w, r >= 3u);
    let x = (s.x + s.y) + (s.z + s.w) + own;
    let at = (lc * HV + hv) * CH + i;
    gc[at] = x;
    bm[at] = raw.y;
    hg[i / 4u][r] = x;
    hm[i / 4u][r] = raw.y;
}

// Head hv's gates, start to end (two barriers): lg from the gate threads' `raw`, then gates_out. Returns
// the gate thread's raw gates of head hv + 1 where `next` (loaded here), else `raw`.
fn gates_of(raw: vec2<f32>, hv: u32, gate: bool, gt: u32, lc: u32, ch: vec3<u32>, next: bool) -> vec2<f32> {
    var r = raw;
    if (gate) {
        lg[gt / 4u][gt % 4u] = raw.x;
    }
    workgroupBarrier();
    if (gate) {
        gates_out(raw, gt, lc, hv);
        if (next) {
            r = gate_raw(hv + 1u, gt, ch);
        }
    }
    workgroupBarrier();
    return r;
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let lc = local_chunk(wid);
    if (lc >= P.n_local) {
        return;
    }
    let hk = wid.x;
    let ch = chunk_at(lc);

    // G = K K^T: thread (ti, tj) owns rows ti*4 .. +4, columns tj*4 .. +4.
    let q4 = CH / 4u;
    let ti = lid / q4;
    let tj = lid % q4;
    let in_tile = ti < q4;
    var gm: array<vec4<f32>, 4>;
    for (var r = 0u; r < 4u; r++) {
        gm[r] = vec4<f32>(0.0);
    }
    // The gates: thread C + i takes row i (2 C <= WG). Those threads are idle in the solve's step 1,
    // where they make the next head's gates, so a head costs no barrier of its own. The first head's
    // raw gates are loaded before the Gram product, each next head's a head ahead.
    let gate = lid >= CH && lid < 2u * CH;
    let gt = lid - CH; // (used by gate threads only)
    var raw = vec2<f32>(0.0);
    if (gate) {
        raw = gate_raw(hk * GROUP, gt, ch);
    }
    var nx = fetch_k(0u, lid, ch, hk);
    for (var m0 = 0u; m0 < select(0u, K, SOLVE); m0 += BS) {
        workgroupBarrier();
        for (var x = 0u; x < (CH * BS / 2u + WG - 1u) / WG; x++) {
            let e = min(lid + WG * x, CH * BS / 2u - 1u);
            let i = e / (BS / 2u);
            let m = 2u * (e % (BS / 2u));
            ks[m * CP + i / 4u][i % 4u] = nx[x].x;
            ks[(m + 1u) * CP + i / 4u][i % 4u] = nx[x].y;
        }
        workgroupBarrier();
        if (m0 + BS < K) {
            nx = fetch_k(m0 + BS, lid, ch, hk);
        }
        if (in_tile) {
            for (var kk = 0u; kk < BS; kk++) {
                outer4(&gm, ks[kk * CP + ti], ks[kk * CP + tj]);
            }
        }
    }

    let nb = CH / NB;
    let db = lid / NB; // step 1: diagonal block and column of this thread
    let dcol = lid % NB;
    raw = gates_of(raw, hk * GROUP, gate, gt, lc, ch, GROUP > 1u);
    if (!SOLVE) { // a backward (it reads the saved A): the other heads' gates, one after the other
        for (var gi = 1u; gi < GROUP; gi++) {
            raw = gates_of(raw, hk * GROUP + gi, gate, gt, lc, ch, gi + 1u < GROUP);
        }
        return;
    }
    for (var gi = 0u; gi < GROUP; gi++) {
        let hv = hk * GROUP + gi;
        let more = gi + 1u < GROUP;
        // N into na (the previous head's A has been written out: barrier at the loop's end).
        if (in_tile) {
            let jv = vec4<u32>(0u, 1u, 2u, 3u) + tj * 4u;
            let gj = hg[tj];
            let gi4 = hg[ti];
            let bi4 = hm[ti];
            for (var r = 0u; r < 4u; r++) {
                let i = ti * 4u + r;
                let n = bi4[r] * gm[r] * exp(gi4[r] - gj);
                na[i * NS4 + tj] = select(vec4<f32>(0.0), n, jv < vec4<u32>(i));
            }
        }
        if (gate && more) {
            lg[gt / 4u][gt % 4u] = raw.x; // the next head's log-decays (this head is done with hg, hm)
        }
        workgroupBarrier();

        // 1. Diagonal blocks: column dcol of (I + N_bb)^-1, rows r0 .. r0 + NB. Right-looking: once
        // x[q] is final it is taken out of every row below at once, so the dependent chain is NB
        // steps long, not NB²/2 (each row's sum waiting on the one before).
        var x: array<f32, NB>;
        let r0 = db * NB;
        if (db < nb) {
            for (var r = 0u; r < NB; r++) {
                x[r] = select(0.0, 1.0, r == dcol);
            }
            for (var q = 0u; q < NB; q++) {
                let xq = x[q];
                for (var r = q + 1u; r < NB; r++) {
                    x[r] -= na_at(r0 + r, r0 + q) * xq;
                }
            }
        }
        if (gate && more) { // (threads C .. 2 C: no diagonal block)
            gates_out(raw, gt, lc, hv + 1u);
            if (gi + 2u < GROUP) {
                raw = gate_raw(hv + 2u, gt, ch);
            }
        }
        workgroupBarrier();
        if (db < nb) {
            for (var r = 0u; r < NB; r++) {
                na[(r0 + r) * NS4 + (r0 + dcol) / 4u][dcol % 4u] = x[r];
            }
        }
        workgroupBarrier();

        // 2. Block rows below the first. Thread lid < p NB²/4 takes row i, columns m4 .. m4 + 4 of
        // block q: one scalar and one vec4 read per 4 FMAs. tb4[lid] holds the same entries' sums.
        let q = lid / (NB * NB / 4u);
        let i = (lid / (NB / 4u)) % NB;
        let m4 = lid % (NB / 4u);
        for (var p = 1u; p < nb; p++) {
            let rp = p * NB;
            let mine = lid < p * (NB * NB / 4u);
            // (Four accumulators quarter the dependent chain of each sum; the second sum runs over the
            // whole block, whose entries right of the diagonal step 1 wrote as zeros.)
            if (mine) {
                var s0 = vec4<f32>(0.0);
                var s1 = vec4<f32>(0.0);
                var s2 = vec4<f32>(0.0);
                var s3 = vec4<f32>(0.0);
                for (var c = q * NB; c < rp; c += 4u) {
                    let at = c * NS4 + q * (NB / 4u) + m4;
                    s0 += na_at(rp + i, c) * na[at];
                    s1 += na_at(rp + i, c + 1u) * na[at + NS4];
                    s2 += na_at(rp + i, c + 2u) * na[at + 2u * NS4];
                    s3 += na_at(rp + i, c + 3u) * na[at + 3u * NS4];
                }
                ks[lid] = (s0 + s1) + (s2 + s3);
            }
            workgroupBarrier();
            if (mine) {
                var s0 = vec4<f32>(0.0);
                var s1 = vec4<f32>(0.0);
                var s2 = vec4<f32>(0.0);
                var s3 = vec4<f32>(0.0);
                for (var c = 0u; c < NB; c += 4u) {
                    let tb = q * (NB * NB / 4u) + c * (NB / 4u) + m4;
                    s0 += na_at(rp + i, rp + c) * ks[tb];
                    s1 += na_at(rp + i, rp + c + 1u) * ks[tb + NB / 4u];
                    s2 += na_at(rp + i, rp + c + 2u) * ks[tb + 2u * (NB / 4u)];
                    s3 += na_at(rp + i, rp + c + 3u) * ks[tb + 3u * (NB / 4u)];
                }
                na[(rp + i) * NS4 + q * (NB / 4u) + m4] = -((s0 + s1) + (s2 + s3));
            }
            workgroupBarrier();
        }

        // A out, zeros above the diagonal and ones on it.
        let ab4 = a_rows(lc, hv) * (CH / 4u);
        for (var e = lid; e < CH * q4; e += WG) {
            let i = e / q4;
            let jv = vec4<u32>(0u, 1u, 2u, 3u) + (e % q4) * 4u;
            let val = na[i * NS4 + e % q4];
            a[ab4 + e] = select(select(vec4<f32>(0.0), val, jv < vec4<u32>(i)), vec4<f32>(1.0), jv == vec4<u32>(i));
        }
        workgroupBarrier();
    }
}
