// accum_f32_atomic.wgsl — gradient accumulation by float atomics (needs SHADER_FLOAT32_ATOMIC).
// `fin` indexes the final sums; `part` (the per-slice partial index) is unused here.

@group(0) @binding(12) var<storage, read_write> acc: array<atomic<f32>>;

fn accum(fin: u32, part: u32, x: f32) {
    atomicAdd(&acc[fin], x);
}
