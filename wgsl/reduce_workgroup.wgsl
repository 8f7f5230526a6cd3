// reduce_workgroup.wgsl — sum over the KT threads that share one state column, through workgroup
// memory. The kernel says where a column's threads are: col_first(lid) + r * col_stride(). The portable fallback when subgroups are missing or smaller than KT. Double-buffered by
// step parity, so one barrier per step suffices: a slot is rewritten two steps later, after every
// thread has passed the barrier of the step in between.

const RED_SLOTS: u32 = 256u;
var<workgroup> red: array<vec3<f32>, 512>;

fn column_sum(x: vec3<f32>, lid: u32, parity: u32) -> vec3<f32> {
    let base = parity * RED_SLOTS;
    red[base + lid] = x;
    workgroupBarrier();
    let first = base + col_first(lid);
    var s = vec3<f32>(0.0);
    for (var r = 0u; r < KT; r++) {
        s += red[first + r * col_stride()];
    }
    return s;
}
