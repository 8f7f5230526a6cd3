// recurrent_common.wgsl — what the recurrent forward and backward share: the input bindings
// (1-6), the shape/dtype/convention overrides, the element loaders and the state offset. Joined
// after the prelude and the reduction variant, before each recurrent pass's own file.
//
// Shapes (rows r = b*T + t of the flattened token axis): q, k [rows, H, K]; v [rows, HV, V];
// g [rows, HV] or [rows, HV, K]; beta [rows, HV]; all bound as array<u32> and decoded per dtype.

@group(0) @binding(1) var<storage, read> q: array<u32>;
@group(0) @binding(2) var<storage, read> k: array<u32>;
@group(0) @binding(3) var<storage, read> v: array<u32>;
@group(0) @binding(4) var<storage, read> g: array<u32>;
@group(0) @binding(5) var<storage, read> beta: array<u32>;
// (decode only) slot indices [N] at 0, then seq offsets [N+1] (at 0 without slots), then mask
// bytes at mask_off.
@group(0) @binding(6) var<storage, read> info: array<u32>;

override H: u32;
override HV: u32;
override K: u32;
override V: u32;
override GROUP: u32 = HV / H;
override BV: u32;            // value columns per workgroup (divides V)
override KT: u32;            // threads per column (power of two)
override KR: u32;            // rows per thread: KT * KR >= K, KR <= MAX_KR
override WG: u32 = KT * BV;  // workgroup size
override QKV_DT: u32 = 0u;
override G_DT: u32 = 0u;
override BETA_DT: u32 = 0u;
override GATE_PER_KEY: bool = false;
override GATE_LINEAR: bool = false;
override LAYOUT_VK: bool = false;
override HAS_MASK: bool = false;

const MAX_KR: u32 = 16u;

fn ld_q(i: u32) -> f32 { return decode(QKV_DT, q[word_of(QKV_DT, i)], i); }
fn ld_k(i: u32) -> f32 { return decode(QKV_DT, k[word_of(QKV_DT, i)], i); }
fn ld_v(i: u32) -> f32 { return decode(QKV_DT, v[word_of(QKV_DT, i)], i); }
fn ld_g(i: u32) -> f32 { return decode(G_DT, g[word_of(G_DT, i)], i); }
fn ld_beta(i: u32) -> f32 { return decode(BETA_DT, beta[word_of(BETA_DT, i)], i); }

// Offset of S[i][j] inside one K x V state (kv or vk layout).
fn s_off(i: u32, j: u32) -> u32 {
    return select(i * V + j, j * K + i, LAYOUT_VK);
}
