// reduce_partials.wgsl — the deterministic mode's second pass: out[e] = sum over s = 0, 1, ..., slices-1
// of src[off + s * len + e], always in that order, so the result is bitwise repeatable.

struct Params {
    len: u32,
    slices: u32,
    off: u32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> src: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;

override WG: u32 = 256u;

@compute @workgroup_size(WG)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let e = gid.x + gid.y * nwg.x * WG;
    if (e >= P.len) {
        return;
    }
    var x = 0.0;
    for (var s = 0u; s < P.slices; s++) {
        x += src[P.off + s * P.len + e];
    }
    out[e] = x;
}
