// chunk_mma_stage.wgsl — shared by the cooperative-matrix walks (chunk_state_mma.wgsl,
// chunk_bwd_state_mma.wgsl): their workgroup size and the C x K operand area `xs` with the copy of
// one f16 operand plane (C x K, 8 halves at a time held in registers as mat2x4<f16>) into it. Rows are padded by 8
// halves (16 bytes) so a tile's rows fall in different banks, and the array is a multiple of 16
// bytes (the alignment rule of docs/PERF.md, R37).

const MWG: u32 = 256u;
override XK: u32 = K + 8u;                  // row stride of xs
override XN: u32 = CH * XK;
override NW8: u32 = CH * K / 8u;            // 8-half (16-byte) vectors per operand plane
override NQ: u32 = (NW8 + MWG - 1u) / MWG;  // of them per thread (<= 4)

var<workgroup> xs: array<f16, XN>;          // [C][XK]: one operand plane at a time

// Stores this thread's 8-half pieces of one operand plane into xs. (The walks load the planes 16
// bytes at a time, as mat2x4<f16>: docs/PERF.md R79.)
fn stage(vecs: array<mat2x4<f16>, 4>, lid: u32) {
    for (var x = 0u; x < NQ; x++) {
        let e = lid + MWG * x;
        if (e < NW8) {
            let at = (e * 8u / K) * XK + (e * 8u) % K;
            let lo = vecs[x][0];
            let hi = vecs[x][1];
            xs[at] = lo.x;
            xs[at + 1u] = lo.y;
            xs[at + 2u] = lo.z;
            xs[at + 3u] = lo.w;
            xs[at + 4u] = hi.x;
            xs[at + 5u] = hi.y;
            xs[at + 6u] = hi.z;
            xs[at + 7u] = hi.w;
        }
    }
}
