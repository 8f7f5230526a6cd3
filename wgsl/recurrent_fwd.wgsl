// recurrent_fwd.wgsl — the gated delta rule, token by token, with the state held on chip.
//
// Per (sequence n, value head hv), S is a K x V matrix (f32), S_0 = h0 or 0, and for each token t:
//     S'  = D_t * S                 D_t = exp(g_t) (log gate) or g_t (linear gate); per-key gate:
//                                   row i of S scaled by D_t[i]
//     e   = v_t - S'^T k_t          (what the memory got wrong)
//     S   = S' + beta_t k_t e^T
//     o_t = scale * S^T q_t = scale * (S'^T q_t + beta_t e (k_t . q_t))
// A masked token leaves S unchanged and writes o_t = 0. ht = S after the last token.
//
// Shapes (rows r = b*T + t of the flattened token axis; sequence n = rows seq[n] .. seq[n+1]):
//   q, k [rows, H, K]   v [rows, HV, V]   g [rows, HV] or [rows, HV, K]   beta [rows, HV]
//   o [rows, HV, V] (f32)   state [slots, HV, K, V] (kv) or [slots, HV, V, K] (vk), f32
//   ckpt [N, HV, NB, K, V] (f32, always kv order): with CHECKPOINT = C > 0, the state before row
//   seq[n] + b*C of each sequence (b < NB = ceil(max_len / C)), for the backward's replay.
// Value head hv reads key head hv / GROUP.
//
// Long sequences are split by the host into segments of at most seg_len tokens, one dispatch each;
// every segment after the first reads the state the previous one stored (STATE_SRC = 2).
//
// Grid: one workgroup per (tile of BV value columns, hv, n). Inside it, KT threads share each
// column (r = lid % KT, c = lid / KT); thread r holds rows i = r + KT*m (m < KR) of its column in
// registers, so a step needs only one KT-wide reduction (three sums at once) and no shared state.
// The state tile is staged through workgroup memory on load and store, so global accesses are
// coalesced for either layout.

struct Params {
    n_seqs: u32,
    seq_off: u32,     // first seq offset in `info` (when VARLEN): after the slots, 0 without
    mask_off: u32,    // first mask word in `info` (when HAS_MASK)
    scale: f32,
    t: u32,           // tokens per batch row (sequence bounds when not VARLEN)
    seg_start: u32,   // this dispatch runs tokens seg_start .. seg_start + seg_len of each sequence
    seg_len: u32,
    ck_blocks: u32,   // NB: checkpoint blocks per (sequence, head) (when CHECKPOINT > 0)
}

@group(0) @binding(0) var<uniform> P: Params;
// Bindings 1-6 (q, k, v, g, beta, info) and the shared overrides are in recurrent_common.wgsl.
@group(0) @binding(7) var<storage, read> h0: array<f32>;
@group(0) @binding(8) var<storage, read_write> o: array<f32>;
@group(0) @binding(9) var<storage, read_write> state: array<f32>;
@group(0) @binding(10) var<storage, read_write> ckpt: array<f32>;

// Where S_0 comes from: 0 zeros, 1 the `h0` buffer, 2 the `state` buffer itself (in place).
override STATE_SRC: u32 = 0u;
override STORE_STATE: bool = false;
// Row n of the batch reads and writes state slot info[n] instead of slot n (the slots lead the
// `info` table, so the slot's address needs no uniform read).
override USE_SLOTS: bool = false;
// Sequence bounds come from `info` (cu_seqlens); otherwise sequence n is rows n*T .. n*T+T, known
// without a dependent memory read (it matters for decode latency).
override VARLEN: bool = false;
// Decode layout (a few tokens): with COL_FAST consecutive threads take consecutive value columns
// (r = lid / BV, c = lid % BV), so for the kv layout each thread's own state elements are read and
// written coalesced straight from registers; STAGE = false then skips the staging tile (for vk the
// default r-fast layout is already coalesced). The column reduction is by workgroup memory.
override COL_FAST: bool = false;
override STAGE: bool = true;
// Save the state every CHECKPOINT tokens of each sequence into `ckpt` (0: off).
override CHECKPOINT: u32 = 0u;
// Workgroups along y before z takes over: the grid's y extent whenever z > 1 (the device's grid
// limit). A constant, so n (and the slot and state reads after it) wait for no uniform load.
override MAX_Y: u32;

override TILE_LEN: u32 = K * BV;  // the staging tile (K * BV <= 4096, host-checked)
var<workgroup> tile: array<f32, TILE_LEN>;
var<workgroup> seq_bounds: vec2<u32>;


// A column's KT threads are invocations col_first(lid) + r * col_stride(), r < KT.
fn col_first(lid: u32) -> u32 {
    return select((lid / KT) * KT, lid % BV, COL_FAST);
}
fn col_stride() -> u32 {
    return select(1u, BV, COL_FAST);
}


// Tile element e (0 <= e < K*BV) in the state's memory order -> (row i, tile column c).
fn tile_rc(e: u32) -> vec2<u32> {
    if (LAYOUT_VK) {
        return vec2<u32>(e % K, e / K);
    }
    return vec2<u32>(e / BV, e % BV);
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let n = wid.y + wid.z * MAX_Y;
    // Layer z = 0 never overhangs (the host's y extent is min(n_seqs, MAX_Y)); only later layers
    // can. Nested, so z = 0 branches without waiting for P.
    if (wid.z > 0u) {
        if (n >= P.n_seqs) {
            return;
        }
    }
    var slot = n;
    if (USE_SLOTS) {
        slot = info[n];
    }
    let tiles = V / BV;
    let hv = wid.x / tiles;
    let j0 = (wid.x % tiles) * BV;
    let hk = hv / GROUP;
    let r = select(lid % KT, lid / BV, COL_FAST);
    let c = select(lid / KT, lid % BV, COL_FAST);
    let j = j0 + c;

    var bounds = vec2<u32>(n * P.t, n * P.t + P.t);
    if (VARLEN) {
        if (lid == 0u) {
            // Without slots the seq offsets start at info[0]: a constant address.
            let so = select(0u, P.seq_off, USE_SLOTS);
            seq_bounds = vec2<u32>(info[so + n], info[so + n + 1u]);
        }
        bounds = workgroupUniformLoad(&seq_bounds);
    }
    // Long sequences run as several dispatches (segments) carrying the state in place, so no
    // dispatch outlives a driver's loop or watchdog limit.
    let seq_lo = bounds.x;
    bounds.x = min(bounds.x + P.seg_start, bounds.y);
    bounds.y = min(bounds.x + P.seg_len, bounds.y);
    let sbase = (slot * HV + hv) * K * V;

    // S_0 -> registers: through the tile (coalesced for either layout), or directly when the
    // thread layout already makes each thread's accesses coalesced.
    var s: array<f32, MAX_KR>;
    if (STAGE) {
        for (var e = lid; e < K * BV; e += WG) {
            let rc = tile_rc(e);
            let src = sbase + s_off(rc.x, j0 + rc.y);
            var x = 0.0;
            if (STATE_SRC == 1u) {
                x = h0[src];
            } else if (STATE_SRC == 2u) {
                x = state[src];
            }
            tile[rc.x * BV + rc.y] = x;
        }
        workgroupBarrier();
        for (var m = 0u; m < KR; m++) {
            let i = r + KT * m;
            s[m] = select(0.0, tile[min(i, K - 1u) * BV + c], i < K);
        }
    } else {
        for (var m = 0u; m < KR; m++) {
            let i = r + KT * m;
            let src = sbase + s_off(min(i, K - 1u), j);
            var x = 0.0;
            if (STATE_SRC == 1u) {
                x = h0[src];
            } else if (STATE_SRC == 2u) {
                x = state[src];
            }
            s[m] = select(0.0, x, i < K);
        }
    }

    var kk: array<f32, MAX_KR>;
    var qq: array<f32, MAX_KR>;
    for (var row = bounds.x; row < bounds.y; row++) {
        let kq_base = (row * H + hk) * K;
        let hrow = row * HV + hv;
        // (max(.., 1u): naga rejects an integer division by a constant zero even in dead code.)
        let every = max(CHECKPOINT, 1u);
        if (CHECKPOINT > 0u && (row - seq_lo) % every == 0u) {
            let cbase = ((n * HV + hv) * P.ck_blocks + (row - seq_lo) / every) * K * V;
            for (var m = 0u; m < KR; m++) {
                let i = r + KT * m;
                if (i < K) {
                    ckpt[cbase + i * V + j] = s[m];
                }
            }
        }
        var live = true;
        if (HAS_MASK) {
            live = byte_of(info[P.mask_off + row / 4u], row) != 0u;
        }
        var d_scalar = 1.0;
        if (!GATE_PER_KEY) {
            d_scalar = ld_g(hrow);
            if (!GATE_LINEAR) {
                d_scalar = exp(d_scalar);
            }
        }
        let v_j = ld_v(hrow * V + j);
        let beta_h = ld_beta(hrow);
        var part = vec3<f32>(0.0);
        for (var m = 0u; m < KR; m++) {
            let i = r + KT * m;
            let ok = i < K;
            let ic = min(i, K - 1u);
            kk[m] = select(0.0, ld_k(kq_base + ic), ok);
            qq[m] = select(0.0, ld_q(kq_base + ic), ok);
            var d = d_scalar;
            if (GATE_PER_KEY) {
                d = ld_g(hrow * K + ic);
                if (!GATE_LINEAR) {
                    d = exp(d);
                }
            }
            s[m] = s[m] * select(1.0, d, live);
            part += vec3<f32>(s[m] * kk[m], s[m] * qq[m], kk[m] * qq[m]);
        }
        let tot = column_sum(part, lid, row & 1u);
        let u = select(0.0, beta_h * (v_j - tot.x), live);
        for (var m = 0u; m < KR; m++) {
            s[m] += kk[m] * u;
        }
        if (r == 0u) {
            o[hrow * V + j] = select(0.0, P.scale * (tot.y + u * tot.z), live);
        }
    }

    if (STORE_STATE && !STAGE) {
        for (var m = 0u; m < KR; m++) {
            let i = r + KT * m;
            if (i < K) {
                state[sbase + s_off(i, j)] = s[m];
            }
        }
    }
    if (STORE_STATE && STAGE) {
        // Registers -> tile -> state (coalesced).
        workgroupBarrier();
        for (var m = 0u; m < KR; m++) {
            let i = r + KT * m;
            if (i < K) {
                tile[i * BV + c] = s[m];
            }
        }
        workgroupBarrier();
        for (var e = lid; e < K * BV; e += WG) {
            let rc = tile_rc(e);
            state[sbase + s_off(rc.x, j0 + rc.y)] = tile[rc.x * BV + rc.y];
        }
    }
}
