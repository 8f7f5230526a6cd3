// reduce_subgroup.wgsl — sum over the KT threads that share one state column, by subgroup shuffles.
// Chosen by the host when the adapter grants subgroups and a column's threads, col_stride() apart,
// sit in one subgroup: KT <= the minimum subgroup size (r = lid % KT), or KT * BV <= it with the
// decode layout's columns fastest (COL_FAST).
// (naga 30 enables subgroup builtins by device capability; it rejects `enable subgroups;`.)

fn column_sum(x: vec3<f32>, lid: u32, parity: u32) -> vec3<f32> {
    var s = x;
    for (var off = 1u; off < KT; off = off << 1u) {
        s += subgroupShuffleXor(s, off * col_stride());
    }
    return s;
}
