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

// IEEE half -> f32 by bit operations: unpack2x16float needs a capability (SHADER_F16_IN_F32) that
// some Vulkan drivers lack, and this keeps every kernel free of optional features.
fn half_to_f32(h: u32) -> f32 {
    let sign = (h & 0x8000u) << 16u;
    let e = (h >> 10u) & 0x1fu;
    let m = h & 0x3ffu;
    if (e == 0u) {
        // Zero and subnormals: m * 2^-24.
        return bitcast<f32>(sign | bitcast<u32>(f32(m) * 5.9604645e-8));
    }
    if (e == 31u) {
        return bitcast<f32>(sign | 0x7f800000u | (m << 13u));
    }
    return bitcast<f32>(sign | ((e + 112u) << 23u) | (m << 13u));
}

// f32 -> IEEE half bits, rounded to nearest even (overflow to inf, NaN kept), by bit operations
// for the same reason: pack2x16float needs SHADER_F16_IN_F32.
fn f32_to_half(x: f32) -> u32 {
    let b = bitcast<u32>(x);
    let sign = (b >> 16u) & 0x8000u;
    let a = b & 0x7fffffffu;
    if (a >= 0x7f800000u) {
        return sign | 0x7c00u | select(0u, 0x200u, a > 0x7f800000u);
    }
    if (a >= 0x477ff000u) {
        return sign | 0x7c00u; // at least 65520: rounds past the largest half
    }
    if (a >= 0x38800000u) {
        // Normal: rebias the exponent by 127 - 15 and round the 13 dropped bits to even (a carry
        // out of the mantissa correctly bumps the exponent).
        let m = a - 0x38000000u;
        return sign | ((m + 0xfffu + ((m >> 13u) & 1u)) >> 13u);
    }
    // Subnormal or zero: |x| * 2^24 is exact in f32, and round() rounds halves to even.
    return sign | u32(round(bitcast<f32>(a) * 16777216.0));
}

// Two values as the halves of one word (a in the low half), like pack2x16float.
fn pack_halves(a: f32, b: f32) -> u32 {
    return f32_to_half(a) | (f32_to_half(b) << 16u);
}

// Element i, given the word that holds it.
fn decode(dt: u32, w: u32, i: u32) -> f32 {
    if (dt == DT_F32) {
        return bitcast<f32>(w);
    }
    let h = select(w & 0xffffu, w >> 16u, (i & 1u) == 1u);
    if (dt == DT_F16) {
        return half_to_f32(h);
    }
    return bitcast<f32>(h << 16u);
}

// Byte i of a byte tensor bound as array<u32> (masks).
fn byte_of(w: u32, i: u32) -> u32 {
    return (w >> (8u * (i & 3u))) & 0xffu;
}
