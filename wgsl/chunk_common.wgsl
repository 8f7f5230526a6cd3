// chunk_common.wgsl — shared by the chunked passes (chunk_*.wgsl): parameters, specialisation
// constants, the chunk table and the mask. Assembled as prelude + this file + the pass's file.
//
// The chunked forward runs over one *window* of chunks at a time (all chunks when they fit the
// scratch budget). A window holds L local chunks; local chunk lc is rows start .. start+len of
// sequence seq (len <= C; a chunk never straddles two sequences). Scratch is laid out per local
// chunk and value head, padded to C rows (rows i >= len of a chunk are zero / identity):
//   gc, bm [L, HV, C]      in-chunk cumulative log-decay; beta with masked tokens zeroed
//   a      [L, HV, C, C]   A = (I + StrictLower(diag(beta) K K^T ∘ Γ))^-1
//   w      [L, HV, C, K]   w = A (beta ∘ exp(gc) ∘ K)
//   u, vn  [L, HV, C, V]   u = A (beta ∘ V), v_new = u - w S (u in f16 with U16)
//   h      [L, HV, K, V]   state at the start of the chunk (kv order)
//   wk16   [L, HV, 2, C, K] f16, two to a u32 word: -w, then K ∘ exp(gc_last - gc) (rows i >= len
//                          zero): the operands of chunk_state_mma.wgsl (chunk_wu.wgsl, W16)
//   qk16   [L, H, QPL, C, K] f16: q [C][K], then k^T [K][C] (rows i >= len zero; } OUT16: operands of
//                          k^T alone with QIN)                                  }
//   h16    [L, HV, K, V]    f16: h                                               } chunk_output_mma
//   vn16   [L, HV, C, V]    f16: v_new                                           } .wgsl
// Inputs keep their own layouts: q, k [rows, H, K], v [rows, HV, V], g, beta [rows, HV] (rows =
// the flattened [B*T] token axis), o [rows, HV, V] f32, states [N, HV, K, V] (kv) or [N, HV, V, K] (vk).
//
// Chunk table `info` (u32 words, built on the host per window):
//   at P.chunk_off: per local chunk, (start row, len, seq)
//   at P.seq_off:   per sequence n, (lo, hi, first): its chunks in this window are local chunks
//                   lo .. hi, in time order; first = 1 when they begin at the sequence's first chunk
//                   (its state then comes from h0), 0 when from the carried state of an earlier window
//   at P.mask_off:  mask bytes, packed four to a word (HAS_MASK)
//   at P.slot_off:  per local chunk, its slot in the window's states h [slots, HV, K, V] (its rank in
//                   position-major order, see `state_slots` in src/ops/chunked.rs): the windows' states
//                   laid end to end are one canonical [G, HV, K, V], so a training forward writes them
//                   straight into the saved states (each window binding its slice) and the backward
//                   reads them back with windows of another size.
// A backward's (lo, hi, flag) has flag = 1 when the window holds the sequence's *last* chunk (its
// dS then starts from dht).

struct Params {
    n_local: u32,    // local chunks L in this window
    chunk_off: u32,
    seq_off: u32,
    mask_off: u32,
    n_seqs: u32,
    wg_per_row: u32, // workgroups along y before z takes over (grid limit)
    scale: f32,
    slot_off: u32,   // per local chunk, its state slot
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
    _pad3: u32,
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> info: array<u32>;

override H: u32;
override HV: u32;
override K: u32;
override V: u32;
override GROUP: u32 = HV / H;
override CH: u32;            // chunk size C: 16, 32 or 64
override QKV_DT: u32 = 0u;
override G_DT: u32 = 0u;
override BETA_DT: u32 = 0u;
override GATE_LINEAR: bool = false;
override LAYOUT_VK: bool = false;
override HAS_MASK: bool = false;
override HAS_H0: bool = false;
override BV: u32 = 16u;      // state pass: value columns per workgroup (divides V)
override BVO: u32 = 64u;     // output pass: value columns per workgroup (divides V)
override QKS: u32 = 16u;     // cooperative-matrix output pass: columns of K per q slice
override QIN: bool = false;  // cooperative-matrix output pass: q staged from the input (no pack pass)
// Planes of qk16 per chunk and key head: q, then k^T; k^T alone with QIN (nothing writes q then).
override QPL: u32 = select(2u, 1u, QIN);
override BD: u32 = 64u;      // w/u pass: output columns per workgroup (divides K and V)
// The f16 operands of the cooperative-matrix output pass (chunk_output_mma.wgsl): q, k from
// chunk_pack16.wgsl and chunk_wu.wgsl, S and v_new from chunk_state_mma.wgsl.
override OUT16: bool = false;
// chunk_state_mma.wgsl also writes S in f32 (h): for the SIMT output pass, a training forward's saved
// states and the stage tests.
override KEEP_F32: bool = true;
// chunk_state_mma.wgsl also writes v_new in f32 (vn), and chunk_wu.wgsl w in f32 under W16: for the
// SIMT output and local passes and the stage tests.
override WV32: bool = true;
// chunk_wu.wgsl writes the state walk's f16 operands wk16 (-w from its result, K ∘ exp(gc_last - gc)
// from the keys it stages) and, with OUT16, k^T of qk16 (q of qk16: chunk_pack16.wgsl).
override W16: bool = false;

// u in f16 (chunk_wu.wgsl writes it as halves) and v_new accumulated in f16 from it
// (chunk_state_mma.wgsl); inference and training forwards on cooperative matrices, where nothing
// reads u or v_new in f32.
override U16: bool = false;

// The cooperative-matrix output pass keeps each subgroup's tiles of P = Q K^T in registers for the
// key head's GROUP value heads (one task per subgroup: host-checked).
override PKEEP: bool = false;

// A is indexed by each chunk's state slot instead of its local index: the training forward writes it
// into the saved A ([G, HV, C, C], canonical like the saved states, bound a window slice at a time)
// and the backward reads it back from there instead of solving again.
override A_SLOT: bool = false;

// Workgroup size of every chunked pass.
const WG: u32 = 256u;
// Largest workgroup tile (floats): C*C, K*BV, C*BD and C*BVO are kept <= TILE (host-checked).
const TILE: u32 = 4096u;

// (start row, len, seq) of local chunk lc.
fn chunk_at(lc: u32) -> vec3<u32> {
    let b = P.chunk_off + 3u * lc;
    return vec3<u32>(info[b], info[b + 1u], info[b + 2u]);
}

// Whether token row `row` is real (not masked out).
fn live(row: u32) -> bool {
    if (!HAS_MASK) {
        return true;
    }
    return byte_of(info[P.mask_off + row / 4u], row) != 0u;
}

// Offset of S[i][j] inside one K x V state in the call's layout.
fn s_off(i: u32, j: u32) -> u32 {
    return select(i * V + j, j * K + i, LAYOUT_VK);
}

// (lo, hi, flag) of sequence n in this window (flag: first chunk, or for a backward last chunk, in
// this window; see above). The state walks pass it through a workgroup variable and
// workgroupUniformLoad in their own entry point, because they branch on it around barriers and
// cooperative-matrix operations. Moving that load into a helper made naga treat the result as
// non-uniform, and the cooperative-matrix walk then went wrong on the H100 (docs/PERF.md, R36).
fn seq_range_of(n: u32) -> vec3<u32> {
    let b = P.seq_off + 3u * n;
    return vec3<u32>(info[b], info[b + 1u], info[b + 2u]);
}

// The 4x4 register-block product of the tiled passes: a (4 rows) x b (4 columns), accumulated into acc.
fn outer4(acc: ptr<function, array<vec4<f32>, 4>>, a: vec4<f32>, b: vec4<f32>) {
    (*acc)[0] += a.x * b;
    (*acc)[1] += a.y * b;
    (*acc)[2] += a.z * b;
    (*acc)[3] += a.w * b;
}

// Offset of the state at the start of local chunk lc, value head hv, in the window's states h.
fn h_base(lc: u32, hv: u32) -> u32 {
    return (info[P.slot_off + lc] * HV + hv) * K * V;
}

// Row offset of local chunk lc, value head hv, in `a` (rows of C; see A_SLOT).
fn a_rows(lc: u32, hv: u32) -> u32 {
    return (select(lc, info[P.slot_off + lc], A_SLOT) * HV + hv) * CH;
}

// Index of the local chunk of the workgroup on the y/z axes of the grid.
fn local_chunk(wid: vec3<u32>) -> u32 {
    return wid.y + wid.z * P.wg_per_row;
}
