// prelude.wgsl — shared by every kernel: element decoding for f32 / f16 / bf16 inputs.
//
// Inputs are bound as array<u32> whatever their dtype, so one WGSL source serves all three and no
// adapter feature is needed: f32 is one word per element, f16 and bf16 are two per word (element i
// in the low half when i is even). bf16 is the high half of an f32, so widening is a shift.

const DT_F32: u32 = 0u;
const DT_F16: u32 = 1u;
const DT_BF16: u32 = 2u;

// Word holding element i of a tensor of dtype dt.
fn word_of(dt: u32, i: u32) -> u32 {
    return select(i >> 1u, i, dt == DT_F32);
}

// Element i, given the word that holds it.
fn decode(dt: u32, w: u32, i: u32) -> f32 {
    if (dt == DT_F32) {
        return bitcast<f32>(w);
    }
    let h = select(w & 0xffffu, w >> 16u, (i & 1u) == 1u);
    if (dt == DT_F16) {
        return unpack2x16float(h).x;
    }
    return bitcast<f32>(h << 16u);
}

// Byte i of a byte tensor bound as array<u32> (masks).
fn byte_of(w: u32, i: u32) -> u32 {
    return (w >> (8u * (i & 3u))) & 0xffu;
}
