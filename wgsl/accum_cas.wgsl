// accum_cas.wgsl — gradient accumulation by a compare-and-swap loop on 32-bit words: the portable
// fallback when the adapter has no float atomics. `part` is unused here.

@group(0) @binding(12) var<storage, read_write> acc: array<atomic<u32>>;

fn accum(fin: u32, part: u32, x: f32) {
    var old = atomicLoad(&acc[fin]);
    loop {
        let r = atomicCompareExchangeWeak(&acc[fin], old, bitcast<u32>(bitcast<f32>(old) + x));
        if (r.exchanged) {
            break;
        }
        old = r.old_value;
    }
}
