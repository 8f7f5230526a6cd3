// accum_partials.wgsl — deterministic accumulation: no atomics; each (slice, element) is written by
// exactly one workgroup, and reduce_partials.wgsl then sums the slices in a fixed order. `fin` is
// unused here.

@group(0) @binding(12) var<storage, read_write> acc: array<f32>;

fn accum(fin: u32, part: u32, x: f32) {
    acc[part] = x;
}
