// chunk_mma_stage.wgsl — shared by the cooperative-matrix walks (chunk_state_mma.wgsl,
// chunk_bwd_state_mma.wgsl): their workgroup size and the C x K operand area `xs` with the copy of
// one f16 operand plane (C x K, 4-half vectors held in registers) into it. Rows are padded by 8
// halves (16 bytes) so a tile's rows fall in different banks, and the array is a multiple of 16
// bytes (the alignment rule of docs/PERF.md, R37).

const MWG: u32 = 256u;
override XK: u32 = K + 8u;                  // row stride of xs
override XN: u32 = CH * XK;
override NW4: u32 = CH * K / 4u;            // 4-half vectors per operand plane
override NQ: u32 = (NW4 + MWG - 1u) / MWG;  // of them per thread (<= 8)

var<workgroup> xs: array<f16, XN>;          // [C][XK]: one operand plane at a time

// Stores this thread's vectors of one operand plane into xs.
fn stage(vecs: array<vec4<f16>, 8>, lid: u32) {
    for (var x = 0u; x < NQ; x++) {
        let e = lid + MWG * x;
        if (e < NW4) {
            let at = (e * 4u / K) * XK + (e * 4u) % K;
            let v = vecs[x];
            xs[at] = v.x;
            xs[at + 1u] = v.y;
            xs[at + 2u] = v.z;
            xs[at + 3u] = v.w;
        }
    }
}
