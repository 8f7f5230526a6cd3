//! Recurrent forward on the GPU against the float64 reference, over the option matrix.
//!
//! Every check prints its relative errors (run with `--nocapture` to see them) and fails above the
//! SPEC tolerance (f32 1e-4, f16/bf16 2e-2); NaN/Inf count as infinite error, and the test engine
//! NaN-poisons outputs before kernels run, so an element a kernel forgets to write fails too.
mod common;
use common::*;
use wgdelta::kernels::recurrent::Tiles;
use wgdelta::kernels::Reduce;
use wgdelta::*;

const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

/// The four (gate space, state layout, scale) conventions: FLA, mlx, and the two mixed ones.
fn conventions() -> [(&'static str, Options); 4] {
    let fla = Options::default();
    let mlx = Options::mlx();
    let log_vk = Options { state_layout: StateLayout::Vk, ..Options::default() };
    let lin_kv = Options { gate_space: GateSpace::Linear, state_layout: StateLayout::Kv, ..Options::default() };
    [("log/kv", fla), ("linear/vk", mlx), ("log/vk", log_vk), ("linear/kv", lin_kv)]
}

#[test]
fn smoke() {
    let e = engine();
    check_forward(e, &Case::new(1, 5, 1, 1, 16, 16));
    check_forward(e, &Case { h0: true, ..Case::new(2, 9, 2, 4, 32, 32) });
}

/// The big matrix, K = V = 32: every (convention, dtype, GQA ratio, h0, output_final_state)
/// combination, with (T, B) cycling through every pair of T in {1, 7, 63, 64, 65, 300} and B in
/// {1, 3}, so each (T, B) pair meets every convention and dtype.
#[test]
fn matrix() {
    let e = engine();
    let ts = [1usize, 7, 63, 64, 65, 300];
    let bs = [1usize, 3];
    let mut cases = Vec::new();
    let mut i = 0usize;
    for (ci, (_, opts)) in conventions().into_iter().enumerate() {
        for dtype in DTYPES {
            for group in [1usize, 2, 4] {
                for h0 in [false, true] {
                    for ofs in [false, true] {
                        // Cycle (T, B) with a stride coprime to 12 so neighbouring options differ.
                        let j = (i * 5 + ci) % 12;
                        i += 1;
                        let (t, b) = (ts[j % 6], bs[j / 6]);
                        let h = if group == 4 { 1 } else { 2 };
                        let mut c = Case::new(b, t, h, h * group, 32, 32);
                        c.dtype = dtype;
                        c.h0 = h0;
                        c.opts = Options { output_final_state: ofs, ..opts };
                        c.seed = 1000 + i as u64;
                        cases.push(c);
                    }
                }
            }
        }
    }
    // Every (T, B) pair must have been drawn.
    for t in ts {
        for b in bs {
            assert!(cases.iter().any(|c| c.t == t && c.b == b), "matrix misses T={t} B={b}");
        }
    }
    check_all(e, "matrix", &cases);
}

/// Full T x B x GQA product in the default convention (f32, h0 and ht on).
#[test]
fn lengths_batches_groups() {
    let e = engine();
    let mut cases = Vec::new();
    for t in [1usize, 7, 63, 64, 65, 300] {
        for b in [1usize, 3] {
            for (h, hv) in [(2, 2), (2, 4), (1, 4)] {
                let mut c = Case::new(b, t, h, hv, 32, 32);
                c.h0 = true;
                c.seed = (t * 100 + b * 10 + hv) as u64;
                cases.push(c);
            }
        }
    }
    // T = 0: no tokens, o is empty, ht = h0.
    let mut c = Case::new(2, 0, 1, 2, 16, 16);
    c.h0 = true;
    cases.push(c);
    check_all(e, "t-b-gqa", &cases);
}

/// Head dimensions: every K the issue names, with several V, on the default engine (subgroup
/// reduction for K <= 64 on llvmpipe, workgroup memory above).
#[test]
fn head_dims() {
    let e = engine();
    let mut cases = Vec::new();
    let combos = [
        (16, 16),
        (16, 64),
        (32, 16),
        (32, 128),
        (64, 64),
        (64, 256),
        (128, 16),
        (128, 128),
        (192, 64),
        (192, 128),
        (256, 64),
        (256, 256),
    ];
    for (i, (k, v)) in combos.into_iter().enumerate() {
        let mut c = Case::new(1, 37, 1, 2, k, v);
        c.h0 = true;
        c.dtype = DTYPES[i % 3];
        c.opts = if i % 2 == 0 { Options::default() } else { Options::mlx() };
        c.opts.output_final_state = true;
        c.seed = 7 + i as u64;
        cases.push(c);
    }
    check_all(e, "head-dims", &cases);
}

/// The workgroup-memory reduction on a device without subgroups, over K and both conventions.
#[test]
fn no_subgroups() {
    let e = engine_no_subgroups();
    assert!(!e.gpu().caps().subgroup);
    let mut cases = Vec::new();
    for (i, (k, v)) in [(16, 32), (32, 32), (64, 16), (128, 64), (192, 32), (256, 128)].into_iter().enumerate() {
        for (ci, (_, opts)) in conventions().into_iter().enumerate() {
            let mut c = Case::new(2, 33, 1, 2, k, v);
            c.h0 = (i + ci) % 2 == 0;
            c.dtype = DTYPES[(i + ci) % 3];
            c.opts = Options { output_final_state: true, ..opts };
            c.seed = 300 + (i * 4 + ci) as u64;
            cases.push(c);
        }
    }
    // Per-key gate and mask through the fallback too.
    let mut c = Case::new(3, 40, 2, 4, 64, 32);
    c.gate = GateKind::PerKey;
    c.mask = true;
    c.h0 = true;
    cases.push(c);
    check_all(e, "no-subgroups", &cases);
}

/// Per-key gate `[B, T, HV, K]` in both gate spaces and layouts, with GQA and every dtype.
#[test]
fn per_key_gate() {
    let e = engine();
    let mut cases = Vec::new();
    for (ci, (_, opts)) in conventions().into_iter().enumerate() {
        for (di, dtype) in DTYPES.into_iter().enumerate() {
            let mut c = Case::new(2, 45, 1, 2, if di == 2 { 128 } else { 32 }, 32);
            c.gate = GateKind::PerKey;
            c.dtype = dtype;
            c.h0 = (ci + di) % 2 == 1;
            c.opts = Options { output_final_state: true, ..opts };
            c.logdecay = (-1.5, -0.001);
            c.seed = 50 + (ci * 3 + di) as u64;
            cases.push(c);
        }
    }
    check_all(e, "per-key", &cases);
}

/// Padding mask `[B, T]` with h0, B = 3, both conventions, U8 and BOOL masks, and a fully masked row.
#[test]
fn mask() {
    let e = engine();
    let mut cases = Vec::new();
    for (ci, (_, opts)) in conventions().into_iter().enumerate() {
        let mut c = Case::new(3, 29, 2, 4, 32, 32);
        c.mask = true;
        c.h0 = true;
        c.dtype = DTYPES[ci % 3];
        c.opts = Options { output_final_state: true, ..opts };
        c.seed = 90 + ci as u64;
        cases.push(c);
    }
    check_all(e, "mask", &cases);

    // BOOL dtype, and batch row 1 fully masked: o rows must be exactly zero there and ht = h0.
    let mut c = Case::new(3, 17, 1, 2, 32, 16);
    c.mask = true;
    c.h0 = true;
    let mut d = c.data();
    let m = d.mask.as_mut().unwrap();
    m.dtype = DType::Bool;
    for t in 0..c.t {
        m.bytes[c.t + t] = 0;
    }
    let (eo, eh) = forward_errors_with(e, &c, &d).unwrap();
    let eh = eh.unwrap();
    println!("[mask] BOOL mask, row 1 fully masked: o {eo:.2e} ht {eh:.2e}");
    assert!(eo <= 1e-4 && eh <= 1e-4, "bool mask: o {eo:.3e} ht {eh:.3e}");
    let dev = d.upload(e);
    let out = e.forward(&dev.inputs(None), &c.opts).unwrap();
    let o = e.download(&out.o).unwrap().to_f32();
    let row = c.t * c.hv * c.v;
    assert!(o[row..2 * row].iter().all(|&x| x == 0.0), "masked row 1 must be exactly zero");
    let ht = e.download(out.ht.as_ref().unwrap()).unwrap().to_f32();
    let h0 = d.h0.as_ref().unwrap().to_f32();
    let s = c.hv * c.k * c.v;
    assert_eq!(&ht[s..2 * s], &h0[s..2 * s], "fully masked sequence must return h0 bit-exactly");
}

/// Variable length: uneven lengths including 0 and 1, h0 and ht per sequence, both conventions.
#[test]
fn cu_seqlens() {
    let e = engine();
    let cu = vec![0i64, 0, 1, 8, 8, 70, 300];
    let mut cases = Vec::new();
    for (ci, (_, opts)) in conventions().into_iter().enumerate() {
        for h0 in [true, false] {
            let mut c = Case::new(1, 300, 1, 2, 32, 32);
            c.cu_seqlens = Some(cu.clone());
            c.h0 = h0;
            c.dtype = DTYPES[(ci + h0 as usize) % 3];
            c.opts = Options { output_final_state: true, ..opts };
            c.seed = 120 + ci as u64 * 2 + h0 as u64;
            cases.push(c);
        }
    }
    // With a mask and a per-key gate and GQA 4 as well.
    let mut c = Case::new(1, 300, 1, 4, 64, 16);
    c.cu_seqlens = Some(cu.clone());
    c.h0 = true;
    c.mask = true;
    c.gate = GateKind::PerKey;
    cases.push(c);
    // Many short sequences, one token each, and a single sequence spanning everything.
    let mut c = Case::new(1, 9, 2, 2, 16, 32);
    c.cu_seqlens = Some((0..=9).collect());
    c.h0 = true;
    cases.push(c);
    let mut c = Case::new(1, 65, 2, 2, 16, 32);
    c.cu_seqlens = Some(vec![0, 65]);
    c.h0 = true;
    cases.push(c);
    check_all(e, "cu_seqlens", &cases);

    // Empty sequences pass h0 through unchanged (bit-exact), and leak nothing into the neighbours.
    let c = &cases[0];
    let d = c.data();
    let dev = d.upload(e);
    let out = e.forward(&dev.inputs(c.cu_seqlens.as_deref()), &c.opts).unwrap();
    let ht = e.download(out.ht.as_ref().unwrap()).unwrap().to_f32();
    let h0 = d.h0.as_ref().unwrap().to_f32();
    let s = c.hv * c.k * c.v;
    for n in [0usize, 3] {
        assert_eq!(&ht[n * s..(n + 1) * s], &h0[n * s..(n + 1) * s], "empty sequence {n} must return its h0");
    }
}

/// cu_seqlens must equal running the sequences one by one.
#[test]
fn cu_seqlens_equals_separate_calls() {
    let e = engine();
    let cu = [0usize, 5, 5, 6, 40];
    let mut c = Case::new(1, 40, 1, 2, 32, 16);
    c.cu_seqlens = Some(cu.iter().map(|&x| x as i64).collect());
    c.h0 = true;
    let d = c.data();
    let dev = d.upload(e);
    let out = e.forward(&dev.inputs(c.cu_seqlens.as_deref()), &c.opts).unwrap();
    let o = e.download(&out.o).unwrap().to_f32();
    let ht = e.download(out.ht.as_ref().unwrap()).unwrap().to_f32();
    let s = c.hv * c.k * c.v;
    let orow = c.hv * c.v;
    let mut worst = 0f64;
    for n in 0..cu.len() - 1 {
        let (a, b) = (cu[n], cu[n + 1]);
        if a == b {
            continue;
        }
        let sub = |x: &HostTensor| slice_tokens(x, a, b);
        let h0n = {
            let h = d.h0.as_ref().unwrap();
            HostTensor {
                shape: vec![1, c.hv, c.k, c.v],
                dtype: DType::F32,
                bytes: h.bytes[n * s * 4..(n + 1) * s * 4].to_vec(),
            }
        };
        let up = |name: &str, x: &HostTensor| e.upload(name, x).unwrap();
        let (q, k, v, g, beta, h0) = (
            up("q", &sub(&d.q)),
            up("k", &sub(&d.k)),
            up("v", &sub(&d.v)),
            up("g", &sub(&d.g)),
            up("beta", &sub(&d.beta)),
            up("h0", &h0n),
        );
        let one = e.forward(&Inputs::new(&q, &k, &v, &g, &beta).with_h0(&h0), &c.opts).unwrap();
        let o1 = e.download(&one.o).unwrap().to_f32();
        let h1 = e.download(one.ht.as_ref().unwrap()).unwrap().to_f32();
        let o_ref: Vec<f64> = o1.iter().map(|&x| x as f64).collect();
        let h_ref: Vec<f64> = h1.iter().map(|&x| x as f64).collect();
        let eo = rel_err(&o[a * orow..b * orow], &o_ref);
        let eh = rel_err(&ht[n * s..(n + 1) * s], &h_ref);
        println!("[cu-vs-separate] seq {n} ({a}..{b}): o {eo:.2e} ht {eh:.2e}");
        worst = worst.max(eo).max(eh);
    }
    assert!(worst <= 1e-6, "packed and separate runs differ: {worst:.3e}");
}

/// Non-default scales in both conventions.
#[test]
fn scale() {
    let e = engine();
    let mut cases = Vec::new();
    for (i, s) in [0.37f32, 2.5, 1.0, -0.5].into_iter().enumerate() {
        let mut c = Case::new(2, 21, 1, 2, 64, 32);
        c.opts = if i % 2 == 0 { Options::default() } else { Options::mlx() };
        c.opts.scale = Some(s);
        c.opts.output_final_state = true;
        c.h0 = true;
        c.seed = 140 + i as u64;
        cases.push(c);
    }
    check_all(e, "scale", &cases);
}

/// Un-normalised keys with strong decay (log-decay near ln 1e-4) for 1000 steps, and near-1
/// decay for 1000 steps: finite and matching.
#[test]
fn strong_and_weak_decay() {
    let e = engine();
    let mut cases = Vec::new();
    for (ci, (_, opts)) in conventions().into_iter().enumerate() {
        let mut c = Case::new(1, 1000, 1, 2, 32, 32);
        c.normalize_k = false;
        c.logdecay = ((1e-4f64).ln() - 0.3, (1e-4f64).ln() + 0.3);
        c.h0 = true;
        c.opts = Options { output_final_state: true, ..opts };
        c.gate = if ci >= 2 { GateKind::PerKey } else { GateKind::Scalar };
        c.seed = 160 + ci as u64;
        cases.push(c.clone());
        // Near-1 decay: the state keeps (almost) everything for 1000 steps.
        c.logdecay = (-1e-3, 0.0);
        c.seed += 10;
        c.dtype = if ci % 2 == 0 { DType::F32 } else { DType::BF16 };
        cases.push(c);
    }
    check_all(e, "decay", &cases);

    // Keys three times longer than unit under strong decay: still finite and matching.
    let mut c = Case::new(1, 1000, 1, 1, 64, 32);
    c.normalize_k = false;
    c.logdecay = ((1e-4f64).ln() - 0.5, (1e-4f64).ln());
    c.h0 = true;
    let mut d = c.data();
    let k: Vec<f64> = d.k.to_f64().iter().map(|x| 3.0 * x).collect();
    d.k = HostTensor::from_f64(&d.k.shape, &k, DType::F32);
    let (eo, eh) = forward_errors_with(e, &c, &d).unwrap();
    let eh = eh.unwrap();
    println!("[decay] |k| ~ 3, strong decay, T=1000: o {eo:.2e} ht {eh:.2e}");
    assert!(eo <= 1e-4 && eh <= 1e-4, "scaled keys: o {eo:.3e} ht {eh:.3e}");

    // Linear gate of exactly 1 (no decay at all) and of exactly 0 (full reset each step).
    for gval in [1.0f64, 0.0] {
        let mut c = Case::new(1, 200, 1, 1, 16, 16);
        c.opts = Options { output_final_state: true, ..Options::mlx() };
        c.h0 = true;
        let mut d = c.data();
        d.g = HostTensor::from_f64(&d.g.shape, &vec![gval; d.g.numel()], DType::F32);
        let (eo, eh) = forward_errors_with(e, &c, &d).unwrap();
        let eh = eh.unwrap();
        println!("[decay] linear gate = {gval}: o {eo:.2e} ht {eh:.2e}");
        assert!(eo <= 1e-4 && eh <= 1e-4, "linear gate {gval}: o {eo:.3e} ht {eh:.3e}");
    }
}

/// T = 100 000 (SPEC: long sequences must stay finite) on both reductions. On llvmpipe this also
/// guards the segmenting: its loop limiter (65535 loop iterations per invocation) silently ends a
/// kernel loop, so one dispatch over all tokens would leave `o` past token ~13k-65k and `ht`
/// unwritten (NaN-poisoned here).
#[test]
fn long_sequence() {
    let mut c = Case::new(1, 100_000, 1, 1, 16, 16);
    c.logdecay = (-0.05, 0.0);
    c.h0 = true;
    c.dtype = DType::BF16;
    let mut c64 = c.clone();
    c64.k = 64;
    c64.opts = Options { output_final_state: true, ..Options::mlx() };
    check_all(engine(), "long", &[c.clone(), c64]);
    check_all(engine_no_subgroups(), "long-nosg", &[c]);
}

/// Long sequences run as several dispatches ("segments" of `Gpu::max_tokens_per_dispatch` tokens,
/// 1024 on llvmpipe) carrying the state in place: lengths just below, at and above one and two
/// segments, with and without h0 and ht (the carry is then a scratch buffer), cu_seqlens whose
/// sequences end in different segments, a mask, a per-key gate, and the fallback reduction.
#[test]
fn segments() {
    let e = engine();
    let seg = e.gpu().max_tokens_per_dispatch();
    println!("[segments] max_tokens_per_dispatch = {seg}");
    let mut cases = Vec::new();
    for (i, t) in [seg - 1, seg, seg + 1, 2 * seg + 1].into_iter().enumerate() {
        for (h0, ofs) in [(false, false), (true, false), (false, true), (true, true)] {
            let n = i * 4 + h0 as usize * 2 + ofs as usize;
            let (_, opts) = conventions()[n % 4];
            let mut c = Case::new(2, t, 1, 2, 16, 16);
            c.h0 = h0;
            c.dtype = DTYPES[n % 3];
            c.opts = Options { output_final_state: ofs, ..opts };
            c.seed = 400 + n as u64;
            cases.push(c);
        }
    }
    let cu =
        vec![0i64, (seg + 5) as i64, (seg + 5) as i64, (seg + 6) as i64, (3 * seg + 2) as i64, (3 * seg + 40) as i64];
    for (ci, (_, opts)) in conventions().into_iter().enumerate() {
        let mut c = Case::new(1, 3 * seg + 40, 1, 2, 32, 16);
        c.cu_seqlens = Some(cu.clone());
        c.h0 = ci != 1;
        c.mask = ci == 2;
        c.gate = if ci == 3 { GateKind::PerKey } else { GateKind::Scalar };
        c.opts = Options { output_final_state: ci != 0, ..opts };
        c.seed = 450 + ci as u64;
        cases.push(c);
    }
    check_all(e, "segments", &cases);

    let mut c = Case::new(3, 2 * seg + 7, 1, 1, 128, 16);
    c.h0 = true;
    c.mask = true;
    check_all(engine_no_subgroups(), "segments-nosg", &[c]);
}

/// g and beta in dtypes other than q/k/v (allowed: only k and v must match q).
#[test]
fn mixed_gate_beta_dtypes() {
    let e = engine();
    for (qkv, gd, bd) in [
        (DType::BF16, DType::F32, DType::F16),
        (DType::F32, DType::BF16, DType::F16),
        (DType::F16, DType::F16, DType::F32),
    ] {
        let mut c = Case::new(2, 19, 1, 2, 32, 32);
        c.dtype = qkv;
        c.h0 = true;
        let mut d = c.data();
        d.g = recast(&d.g, gd);
        d.beta = recast(&d.beta, bd);
        let (eo, eh) = forward_errors_with(e, &c, &d).unwrap();
        let eh = eh.unwrap();
        let tol = fwd_tol(qkv);
        println!("[mixed] qkv {qkv} g {gd} beta {bd}: o {eo:.2e} ht {eh:.2e} tol {tol:.0e}");
        assert!(eo <= tol && eh <= tol, "qkv {qkv} g {gd} beta {bd}: o {eo:.3e} ht {eh:.3e}");
    }
}

/// Forced tilings, each on its own engine: narrow and wide column tiles, one column per
/// workgroup, KT beyond K, subgroup reduction at larger K, and the fallback.
#[test]
fn forced_tilings() {
    let sg = Reduce::Subgroup;
    let wg = Reduce::Workgroup;
    let runs: [(Tiles, usize, usize); 9] = [
        (Tiles { kt: 2, kr: 16, bv: 16, reduce: wg }, 32, 32),
        (Tiles { kt: 4, kr: 8, bv: 1, reduce: sg }, 32, 32),
        (Tiles { kt: 8, kr: 4, bv: 32, reduce: sg }, 32, 64),
        (Tiles { kt: 64, kr: 1, bv: 4, reduce: wg }, 32, 16),
        (Tiles { kt: 32, kr: 1, bv: 8, reduce: wg }, 16, 16),
        (Tiles { kt: 8, kr: 16, bv: 16, reduce: sg }, 128, 64),
        (Tiles { kt: 16, kr: 16, bv: 8, reduce: wg }, 256, 32),
        (Tiles { kt: 16, kr: 12, bv: 1, reduce: wg }, 192, 16),
        (Tiles { kt: 128, kr: 2, bv: 2, reduce: wg }, 256, 16),
    ];
    for (tiles, k, v) in runs {
        let e = engine_with_tiles(Some(tiles), true);
        assert!(tiles.valid(k, v, e.gpu().caps()), "{tiles:?} should be valid for K={k} V={v}");
        let mut cases = Vec::new();
        for (ci, (_, opts)) in conventions().into_iter().enumerate().step_by(1) {
            let mut c = Case::new(2, 23, 1, 2, k, v);
            c.h0 = ci % 2 == 0;
            c.mask = ci == 3;
            c.gate = if ci == 2 { GateKind::PerKey } else { GateKind::Scalar };
            c.dtype = DTYPES[ci % 3];
            c.opts = Options { output_final_state: true, ..opts };
            c.seed = 200 + ci as u64;
            cases.push(c);
        }
        check_all(&e, &format!("tiles {}x{}x{} {:?}", tiles.kt, tiles.kr, tiles.bv, tiles.reduce), &cases);
    }
}

/// A forced tiling that does not fit the problem is a typed Error::Option, not a device error.
#[test]
fn invalid_forced_tiling() {
    let wg = Reduce::Workgroup;
    let sg = engine().gpu().caps().subgroup_min.max(1);
    let bad = [
        (Tiles { kt: 2, kr: 8, bv: 8, reduce: wg }, "KT*KR < K"),
        (Tiles { kt: 3, kr: 16, bv: 8, reduce: wg }, "KT not a power of two"),
        (Tiles { kt: 2, kr: 17, bv: 8, reduce: wg }, "KR above MAX_KR"),
        (Tiles { kt: 4, kr: 8, bv: 3, reduce: wg }, "BV does not divide V"),
        (Tiles { kt: 4, kr: 8, bv: 0, reduce: wg }, "BV = 0"),
        // (Twice this device's smallest subgroup: 16 on the software driver, 64 on an H100.)
        (
            Tiles { kt: 2 * sg, kr: 32u32.div_ceil(2 * sg).max(1), bv: 1, reduce: Reduce::Subgroup },
            "subgroup reduction with KT above the subgroup size",
        ),
        (Tiles { kt: 64, kr: 1, bv: 8, reduce: wg }, "workgroup above 256 threads"),
    ];
    let c = Case::new(1, 4, 1, 1, 32, 32);
    let d = c.data();
    for (tiles, why) in bad {
        let e = engine_with_tiles(Some(tiles), true);
        let dev = d.upload(&e);
        let r = e.forward(&dev.inputs(None), &c.opts);
        println!("[bad tiles] {why}: {:?}", r.as_ref().err());
        assert!(matches!(r, Err(Error::Option { name: "recurrent_tiles", .. })), "{why}: {tiles:?} gave {r:?}");
    }
    // Subgroup reduction forced on a device without subgroups.
    let e = engine_with_tiles(Some(Tiles { kt: 4, kr: 8, bv: 8, reduce: Reduce::Subgroup }), false);
    let dev = d.upload(&e);
    let r = e.forward(&dev.inputs(None), &c.opts);
    assert!(matches!(r, Err(Error::Option { name: "recurrent_tiles", .. })), "subgroup tiles without subgroups: {r:?}");
}

/// Two identical runs give bitwise-identical outputs (default and fallback engines).
#[test]
fn deterministic() {
    for (name, e) in [("default", engine()), ("no-subgroups", engine_no_subgroups())] {
        let mut c = Case::new(3, 70, 2, 4, 64, 32);
        c.h0 = true;
        c.mask = true;
        c.dtype = DType::BF16;
        let d = c.data();
        let dev = d.upload(e);
        let run = || {
            let out = e.forward(&dev.inputs(None), &c.opts).unwrap();
            (e.download(&out.o).unwrap().bytes, e.download(out.ht.as_ref().unwrap()).unwrap().bytes)
        };
        let (o1, h1) = run();
        let (o2, h2) = run();
        let diff =
            o1.iter().zip(&o2).filter(|(a, b)| a != b).count() + h1.iter().zip(&h2).filter(|(a, b)| a != b).count();
        println!("[deterministic] {name}: {diff} differing bytes of {}", o1.len() + h1.len());
        assert!(o1 == o2 && h1 == h2, "{name}: two identical runs differ in {diff} bytes");
    }
}

/// The subgroup and workgroup reductions agree closely with each other.
#[test]
fn reductions_agree() {
    let mut c = Case::new(2, 50, 1, 2, 64, 32);
    c.h0 = true;
    let d = c.data();
    let run = |e: &Engine| {
        let dev = d.upload(e);
        let out = e.forward(&dev.inputs(None), &c.opts).unwrap();
        e.download(&out.o).unwrap().to_f32()
    };
    let a = run(engine());
    let b = run(engine_no_subgroups());
    let b64: Vec<f64> = b.iter().map(|&x| x as f64).collect();
    let err = rel_err(&a, &b64);
    println!("[reductions] subgroup vs workgroup memory: {err:.2e}");
    assert!(err <= 1e-6, "subgroup and workgroup reductions differ: {err:.3e}");
}
