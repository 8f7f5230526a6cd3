// reduce_subgroup.wgsl — sum over the KT threads that share one state column, by subgroup shuffles.
// Chosen by the host when the adapter grants subgroups and KT <= its minimum subgroup size; the
// KT threads of a column are consecutive invocations (r = lid % KT), so they sit in one subgroup.
// (naga 30 enables subgroup builtins by device capability; it rejects `enable subgroups;`.)

fn column_sum(x: vec3<f32>, lid: u32, parity: u32) -> vec3<f32> {
    var s = x;
    for (var off = 1u; off < KT; off = off << 1u) {
        s += subgroupShuffleXor(s, off * col_stride());
    }
    return s;
}
