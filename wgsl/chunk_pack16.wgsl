// chunk_pack16.wgsl — the f16 operands of the cooperative-matrix state walk (chunk_state_mma.wgsl),
// made here in parallel so the sequential walk only copies them:
//     wk16[lc, hv, 0][i, m] = -w[lc, hv][i, m]
//     wk16[lc, hv, 1][i, m] = k_i[m] exp(gc_last - gc_i)      (0 for rows i >= len)
// and with OUT16 those of the cooperative-matrix output pass (chunk_output_mma.wgsl), per key head:
//     qk16[lc, hk, 0][i, m] = q_i[m],  qk16[lc, hk, 1][i, m] = k_i[m]   (0 for rows i >= len)
// Under W16 chunk_wu.wgsl makes wk16 and k of qk16, and this pass only q of qk16.
// Outputs wk16 [L, HV, 2, C, K] and qk16 [L, H, 2, C, K] as u32 words of two halves (columns m, m + 1), rounded to nearest even
// by bit operations (prelude), so this pass needs no f16 support.
//
// Grid: (HV * C * K / (2 * WG), local chunks on y/z) (H instead of HV under W16); one thread per word
// of both planes (threads of the first H heads also take a word of each qk16 plane).

@group(0) @binding(2) var<storage, read> k: array<u32>;
@group(0) @binding(3) var<storage, read> gc: array<f32>;
@group(0) @binding(4) var<storage, read> w: array<f32>;
@group(0) @binding(5) var<storage, read_write> wk16: array<u32>;
@group(0) @binding(6) var<storage, read> q: array<u32>;
@group(0) @binding(7) var<storage, read_write> qk16: array<u32>;

fn ld_k(i: u32) -> f32 { return decode(QKV_DT, k[word_of(QKV_DT, i)], i); }
fn ld_q(i: u32) -> f32 { return decode(QKV_DT, q[word_of(QKV_DT, i)], i); }

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let lc = local_chunk(wid);
    let words = CH * K / 2u; // per plane
    let x = wid.x * WG + lid;
    if (lc >= P.n_local || x >= select(HV, H, W16) * words) {
        return;
    }
    let hv = x / words;
    let i = (x % words) / (K / 2u);
    let m = 2u * (x % (K / 2u));
    let ch = chunk_at(lc);
    let hb = (lc * HV + hv) * CH;
    let wi = (hb + i) * K + m;
    let plane = (lc * HV + hv) * 2u * words;
    if (!W16) {
        wk16[plane + x % words] = pack_halves(-w[wi], -w[wi + 1u]);
        var kd = vec2<f32>(0.0);
        if (i < ch.y) {
            let kb = ((ch.x + i) * H + hv / GROUP) * K + m;
            kd = exp(gc[hb + ch.y - 1u] - gc[hb + i]) * vec2<f32>(ld_k(kb), ld_k(kb + 1u));
        }
        wk16[plane + words + x % words] = pack_halves(kd.x, kd.y);
    }
    if (OUT16 && hv < H) {
        var qv = vec2<f32>(0.0);
        var kv = vec2<f32>(0.0);
        if (i < ch.y) {
            let at = ((ch.x + i) * H + hv) * K + m; // hv is the key head here
            qv = vec2<f32>(ld_q(at), ld_q(at + 1u));
            kv = vec2<f32>(ld_k(at), ld_k(at + 1u));
        }
        let qp = (lc * H + hv) * 2u * words + x % words;
        qk16[qp] = pack_halves(qv.x, qv.y);
        if (!W16) {
            qk16[qp + words] = pack_halves(kv.x, kv.y);
        }
    }
}
