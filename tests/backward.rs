//! Recurrent backward on the GPU against the float64 reference: every gradient over the option
//! matrix, the three accumulation mechanisms, deterministic repeatability, and saved-state size.
mod common;
use common::*;
use std::sync::OnceLock;
use wgdelta::kernels::recurrent::Tiles;
use wgdelta::reference;
use wgdelta::*;

/// An engine whose backward uses `accum`, with checkpoints every `every` tokens (`None`: default).
fn engine_with(accum: Accum, every: Option<usize>, no_subgroups: bool) -> Engine {
    let gpu = Gpu::with_options(&GpuOptions {
        shader_checks: checks(),
        disable_features: if no_subgroups { wgpu::Features::SUBGROUP } else { wgpu::Features::empty() },
        ..Default::default()
    })
    .expect("a GPU adapter");
    Engine::with_settings(
        gpu,
        Settings {
            poison_outputs: Some(true),
            accum: Some(accum),
            checkpoint_every: every,
            // Per-pass labels, to see which passes ran.
            profile: wgdelta::Profile::Passes,
            ..Default::default()
        },
    )
}

fn atomic() -> &'static Engine {
    static E: OnceLock<Engine> = OnceLock::new();
    E.get_or_init(|| engine_with(Accum::F32Atomic, None, false))
}
fn cas() -> &'static Engine {
    static E: OnceLock<Engine> = OnceLock::new();
    E.get_or_init(|| engine_with(Accum::CasLoop, None, false))
}
fn det() -> &'static Engine {
    static E: OnceLock<Engine> = OnceLock::new();
    E.get_or_init(|| engine_with(Accum::Deterministic, None, false))
}
/// Short blocks (C = 5) and no subgroups: many block boundaries, workgroup-memory reductions.
fn short_blocks() -> &'static Engine {
    static E: OnceLock<Engine> = OnceLock::new();
    E.get_or_init(|| engine_with(Accum::CasLoop, Some(5), true))
}

fn grad_tol(dt: DType) -> f64 {
    if dt == DType::F32 {
        3e-4
    } else {
        2e-2
    }
}

/// A backward case: a forward case plus whether `dht` is given and the dtype of `do`.
#[derive(Clone, Debug)]
struct BCase {
    c: Case,
    dht: bool,
    do_dtype: DType,
}

/// The case on the recurrent backward unless it names another algorithm (`Auto` would take the
/// chunked passes for a scalar gate; the tests of the recurrent kernel pin it).
fn bcase(mut c: Case, dht: bool) -> BCase {
    if c.opts.algorithm == Algorithm::Auto {
        c.opts.algorithm = Algorithm::Recurrent;
    }
    BCase { c, dht, do_dtype: DType::F32 }
}

/// Host upstream gradients of a case: `do` (rounded to its dtype) and `dht`.
fn upstream(b: &BCase) -> (HostTensor, Option<HostTensor>) {
    let c = &b.c;
    let mut rng = Rng::new(c.seed ^ 0x5eed);
    let shape = [c.b, c.t, c.hv, c.v];
    let d_o = HostTensor::from_f64(&shape, &rng.normals(shape.iter().product()), b.do_dtype);
    let s = c.state_shape();
    let dht = b.dht.then(|| HostTensor::from_f64(&s, &rng.normals(s.iter().product()), DType::F32));
    (d_o, dht)
}

/// GPU gradients, downloaded: dq, dk, dv, dg, dbeta, dh0.
type GpuGrads = Vec<(&'static str, Vec<f32>)>;

fn run_gpu(e: &Engine, b: &BCase, d: &CaseData, d_o: &HostTensor, dht: Option<&HostTensor>) -> (GpuGrads, Saved) {
    let dev = d.upload(e);
    let x = dev.inputs(b.c.cu_seqlens.as_deref());
    let (_, saved) = e.forward_train(&x, &b.c.opts).unwrap_or_else(|err| panic!("{}: {err}", b.c.label()));
    let d_o = e.upload("do", d_o).expect("upload do");
    let dht = dht.map(|t| e.upload("dht", t).expect("upload dht"));
    let gr = e.backward(&saved, &d_o, dht.as_ref()).unwrap_or_else(|err| panic!("{}: {err}", b.c.label()));
    let dl = |t: &Tensor| e.download(t).expect("download").to_f32();
    let mut out =
        vec![("dq", dl(&gr.dq)), ("dk", dl(&gr.dk)), ("dv", dl(&gr.dv)), ("dg", dl(&gr.dg)), ("dbeta", dl(&gr.dbeta))];
    if let Some(t) = &gr.dh0 {
        out.push(("dh0", dl(t)));
    }
    (out, saved)
}

fn reference_grads(
    b: &BCase,
    d: &CaseData,
    d_o: &HostTensor,
    dht: Option<&HostTensor>,
) -> Vec<(&'static str, Vec<f64>)> {
    let p = problem(&b.c, d);
    let wide = d.to_f64();
    let x = wide.inputs();
    let dht = dht.map(|t| t.to_f64());
    let r = reference::backward(&p, &x, &d_o.to_f64(), dht.as_deref());
    let mut out = vec![("dq", r.dq), ("dk", r.dk), ("dv", r.dv), ("dg", r.dg), ("dbeta", r.dbeta)];
    if let Some(dh0) = r.dh0 {
        out.push(("dh0", dh0));
    }
    out
}

/// Runs a case on `e` and the reference; prints and checks every gradient's relative error.
/// Returns the GPU gradients and the largest error.
fn check_backward(e: &Engine, b: &BCase) -> (GpuGrads, f64) {
    let d = b.c.data();
    let (d_o, dht) = upstream(b);
    let (gpu, saved) = run_gpu(e, b, &d, &d_o, dht.as_ref());
    let refg = reference_grads(b, &d, &d_o, dht.as_ref());
    assert_eq!(gpu.len(), refg.len(), "{}: dh0 present on one side only", b.c.label());
    let tol = grad_tol(b.c.dtype);
    let mut line = String::new();
    let mut worst = 0.0f64;
    let mut bad = Vec::new();
    for ((name, a), (_, r)) in gpu.iter().zip(&refg) {
        let err = rel_err(a, r);
        line += &format!(" {name} {err:.1e}");
        worst = worst.max(err);
        if err.is_nan() || err > tol {
            bad.push(format!("{name} {err:.3e}"));
        }
    }
    // Saved state: ceil(len / C) states per (sequence, value head), never one per token: per
    // sequence padded to the longest (recurrent), or per chunk (chunked).
    let p = saved.problem();
    let (hv, k, v) = (p.dims.hv, p.dims.k, p.dims.v);
    let shape = match saved.chunk() {
        None => vec![p.n_seqs(), hv, p.seqs.max_len().div_ceil(saved.every()), k, v],
        Some(c) => vec![(0..p.n_seqs()).map(|s| p.seqs.range(s).len().div_ceil(c as usize)).sum(), hv, k, v],
    };
    assert_eq!(saved.checkpoints().shape(), &shape[..]);
    let how = match saved.chunk() {
        Some(c) => format!("chunked C={c}"),
        None => format!("{:?}", e.backward_accum(p)),
    };
    println!("{:<100} dht={} {:?} {how}:{line}  (tol {tol:.0e})", b.c.label(), b.dht, b.do_dtype);
    assert!(bad.is_empty(), "{} dht={}: {} above {tol:.0e}", b.c.label(), b.dht, bad.join(", "));
    (gpu, worst)
}

fn mlx(c: Case) -> Case {
    Case { opts: Options { output_final_state: true, ..Options::mlx() }, ..c }
}

#[test]
fn gradients_over_t_and_b() {
    // T in {1, 7, 64, 65, 300}, B in {1, 3}; GQA, h0, dht, conventions, gate and dtype rotate.
    let groups = [1, 2, 4];
    let dtypes = [DType::F32, DType::BF16, DType::F16];
    let mut i = 0;
    for t in [1, 7, 64, 65, 300] {
        for b in [1, 3] {
            let hv = 2 * groups[i % 3];
            let mut c = Case::new(b, t, 2, hv, 32, 32);
            c.dtype = dtypes[(i / 2) % 3];
            c.h0 = i % 2 == 0;
            c.gate = if i % 4 == 3 { GateKind::PerKey } else { GateKind::Scalar };
            c.seed = 100 + i as u64;
            if i % 3 == 1 {
                c = mlx(c);
            }
            check_backward(atomic(), &bcase(c, i % 2 == 1 || i % 5 == 0));
            i += 1;
        }
    }
}

#[test]
fn gradients_for_every_option() {
    let e = atomic();
    for (gate, space_mlx) in
        [(GateKind::Scalar, false), (GateKind::Scalar, true), (GateKind::PerKey, false), (GateKind::PerKey, true)]
    {
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let mut c = Case::new(2, 70, 1, 2, 32, 16);
            c.gate = gate;
            c.dtype = dtype;
            c.h0 = true;
            c.mask = true;
            c.seed = 7;
            if space_mlx {
                c = mlx(c);
            }
            check_backward(e, &bcase(c, true));
        }
    }
}

#[test]
fn gradients_with_cu_seqlens_and_mask() {
    let e = atomic();
    // Lengths 0, 1, 66, 5, 130: empty and single-token sequences, block boundaries.
    let cu = vec![0, 0, 1, 67, 72, 202];
    for (gate, mask, h0, dht, hv) in [
        (GateKind::Scalar, false, true, true, 4),
        (GateKind::PerKey, true, true, false, 2),
        (GateKind::Scalar, true, false, true, 8),
    ] {
        let mut c = Case::new(1, 202, 2, hv, 32, 32);
        c.cu_seqlens = Some(cu.clone());
        c.gate = gate;
        c.mask = mask;
        c.h0 = h0;
        c.seed = 11;
        check_backward(e, &bcase(c.clone(), dht));
        check_backward(e, &bcase(mlx(c), dht));
    }
}

#[test]
fn gradients_at_larger_head_dims() {
    // K = 64: KT = 8 (subgroup reduce); K = 128: KT = 16 (workgroup reduce, BV = 4).
    for (k, v, gate) in [(64, 64, GateKind::Scalar), (128, 64, GateKind::PerKey), (128, 128, GateKind::Scalar)] {
        let mut c = Case::new(1, 65, 1, 2, k, v);
        c.gate = gate;
        c.h0 = true;
        c.seed = 21;
        check_backward(atomic(), &bcase(c, true));
    }
    let mut c = mlx(Case::new(2, 40, 2, 4, 64, 32));
    c.dtype = DType::BF16;
    c.mask = true;
    check_backward(atomic(), &BCase { c, dht: true, do_dtype: DType::BF16 });
}

#[test]
fn short_blocks_without_subgroups() {
    // C = 5: most steps cross a block boundary; workgroup-memory column sums; CAS accumulation.
    let e = short_blocks();
    for (t, gate, mask) in [(1, GateKind::Scalar, false), (23, GateKind::PerKey, true), (64, GateKind::Scalar, true)] {
        let mut c = Case::new(2, t, 2, 4, 32, 32);
        c.gate = gate;
        c.mask = mask;
        c.h0 = true;
        check_backward(e, &bcase(c.clone(), true));
        check_backward(e, &bcase(mlx(c), false));
    }
    let mut c = Case::new(1, 77, 1, 1, 128, 32);
    c.cu_seqlens = Some(vec![0, 31, 31, 77]);
    c.h0 = true;
    check_backward(e, &bcase(c, true));
}

fn max_rel_diff(a: &GpuGrads, b: &GpuGrads) -> f64 {
    a.iter()
        .zip(b)
        .map(|((_, x), (_, y))| {
            let y64: Vec<f64> = y.iter().map(|&v| v as f64).collect();
            rel_err(x, &y64)
        })
        .fold(0.0, f64::max)
}

#[test]
fn accumulation_mechanisms_agree() {
    let mut cases = Vec::new();
    let mut c = Case::new(2, 65, 2, 8, 32, 32);
    c.h0 = true;
    c.mask = true;
    cases.push(bcase(c, true));
    let mut c = mlx(Case::new(1, 100, 1, 4, 64, 64));
    c.gate = GateKind::PerKey;
    c.cu_seqlens = Some(vec![0, 37, 100]);
    cases.push(bcase(c, false));
    // Its own deterministic engine: other tests share `det()`, and their calls would interleave with
    // this one's in the profile queue that `last_profile` reads.
    let det_own = engine_with(Accum::Deterministic, None, false);
    for b in &cases {
        let (ga, ea) = check_backward(atomic(), b);
        let (gc, ec) = check_backward(cas(), b);
        let (gd, ed) = check_backward(&det_own, b);
        let passes: Vec<&str> = det_own.last_profile().unwrap_or_default().iter().map(|t| t.label).collect();
        println!("  deterministic passes: {passes:?}");
        assert!(passes.contains(&"wgdelta.reduce_partials"), "deterministic mode ran no reduction pass");
        let (ac, ad) = (max_rel_diff(&ga, &gc), max_rel_diff(&ga, &gd));
        println!("  f32-atomic {ea:.1e} | cas {ec:.1e} | deterministic {ed:.1e} vs reference; atomic vs cas {ac:.1e}, atomic vs det {ad:.1e}");
        assert!(ac < 1e-5 && ad < 1e-5, "accumulation mechanisms disagree: {ac:.2e} {ad:.2e}");
    }
}

#[test]
fn deterministic_mode_is_bitwise_repeatable() {
    let mut c = Case::new(1, 130, 2, 8, 32, 32);
    c.h0 = true;
    c.gate = GateKind::PerKey;
    let b = bcase(c, true);
    let d = b.c.data();
    let (d_o, dht) = upstream(&b);
    // Through the user option, not the forced setting.
    let e = engine();
    let mut b_opt = b.clone();
    b_opt.c.opts.deterministic = true;
    let mut first: Option<GpuGrads> = None;
    for run in 0..5 {
        let (g, saved) = run_gpu(e, &b_opt, &d, &d_o, dht.as_ref());
        assert_eq!(e.backward_accum(saved.problem()), Accum::Deterministic);
        match &first {
            None => first = Some(g),
            Some(f) => {
                for ((name, a), (_, b)) in f.iter().zip(&g) {
                    let same = a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
                    assert!(same, "run {run}: {name} differs bitwise from run 0");
                }
            }
        }
    }
    println!("deterministic: 5 runs bitwise identical ({})", b.c.label());
    check_backward(det(), &b);
}

#[test]
fn checkpoints_match_reference_and_stay_small() {
    let e = atomic();
    let mut c = Case::new(1, 300, 1, 2, 32, 32);
    c.cu_seqlens = Some(vec![0, 10, 300]);
    c.h0 = true;
    c.mask = true;
    let d = c.data();
    let dev = d.upload(e);
    let (_, saved) = e.forward_train(&dev.inputs(c.cu_seqlens.as_deref()), &c.opts).expect("forward_train");
    let p = problem(&c, &d);
    let wide = d.to_f64();
    let x = wide.inputs();
    let every = saved.every();
    let want = reference::recurrent::checkpoints(&p, &x, every);
    let got = e.download(saved.checkpoints()).expect("download").to_f32();
    let err = rel_err(&got, &want);
    // N = 2 sequences (10 and 290 tokens), HV = 2, NB = ceil(290 / 64) = 5 states each.
    assert_eq!(saved.checkpoints().shape(), &[2, 2, 5, 32, 32]);
    let per_token = (c.t * c.hv * c.k * c.v * 4) as u64;
    println!(
        "checkpoints: C = {every}, shape {:?}, {} bytes (one state per token would be {per_token}), rel err {err:.1e}",
        saved.checkpoints().shape(),
        saved.state_bytes()
    );
    assert_eq!(saved.state_bytes(), 2 * 2 * 5 * 32 * 32 * 4);
    assert!(err < 1e-5, "checkpoint rel err {err:.2e}");
}

#[test]
fn backward_validates_upstream_gradients() {
    let e = atomic();
    let c = Case::new(1, 8, 1, 1, 16, 16);
    let d = c.data();
    let dev = d.upload(e);
    let (_, saved) = e.forward_train(&dev.inputs(None), &c.opts).expect("forward_train");
    let bad = e.upload("do", &HostTensor::from_f32(&[1, 8, 1, 8], &[0.0; 64])).expect("upload");
    assert!(matches!(e.backward(&saved, &bad, None), Err(Error::Shape { name: "do", .. })));
    let d_o = e.upload("do", &HostTensor::from_f32(&[1, 8, 1, 16], &[0.0; 128])).expect("upload");
    let bad_dht = e.upload("dht", &HostTensor::from_f32(&[1, 1, 16, 8], &[0.0; 128])).expect("upload");
    assert!(matches!(e.backward(&saved, &d_o, Some(&bad_dht)), Err(Error::Shape { name: "dht", .. })));
}

#[test]
fn strong_decay_and_raw_keys_stay_finite() {
    // Decays down to 1e-4 (SPEC 6) and un-normalised keys; both gate forms, both conventions.
    for (gate, conv_mlx) in [(GateKind::Scalar, false), (GateKind::PerKey, true)] {
        let mut c = Case::new(1, 300, 1, 2, 32, 32);
        c.gate = gate;
        c.logdecay = (-9.2, -0.001);
        c.normalize_k = false;
        c.h0 = true;
        if conv_mlx {
            c = mlx(c);
        }
        check_backward(atomic(), &bcase(c, true));
    }
}

/// On a software driver the backward's length limit is real: gradients are right at the limit
/// (so the loop limiter has not cut the walk short) and one token more is a typed error, not a
/// silent wrong answer. On hardware GPUs there is no such limit.
#[test]
fn software_driver_length_limit() {
    let e = engine_with(Accum::CasLoop, None, true);
    let c = Case::new(1, 8, 1, 1, 128, 16);
    let p_tiles = {
        let d = c.data();
        let dev = d.upload(&e);
        let (_, saved) = e.forward_train(&dev.inputs(None), &c.opts).expect("forward_train");
        let p = saved.problem().clone();
        Tiles::choose(p.dims.k, p.dims.v, 4096, e.gpu().caps()).for_backward(p.dims.k)
    };
    let limit = e.gpu().max_backward_tokens(p_tiles.kt, p_tiles.reduce);
    println!("backward limit on this adapter for K=128 ({p_tiles:?}): {limit} tokens");
    if limit == usize::MAX {
        return;
    }
    let mut at = c.clone();
    at.t = limit;
    at.logdecay = (-0.05, 0.0);
    check_backward(&e, &bcase(at.clone(), true));
    let mut over = at;
    over.t = limit + 1;
    let d = over.data();
    let dev = d.upload(&e);
    let (_, saved) = e.forward_train(&dev.inputs(None), &over.opts).expect("forward_train");
    let (d_o, _) = upstream(&bcase(over.clone(), false));
    let d_o = e.upload("do", &d_o).expect("upload do");
    let err = e.backward(&saved, &d_o, None).expect_err("one token past the limit must be refused");
    println!("T = {}: {err}", limit + 1);
    assert!(matches!(err, Error::Unsupported(_)), "{err:?}");
}

/// The case on the chunked backward with chunks of `chunk` (the forward saves states every `chunk`).
fn chunked(c: Case, chunk: u32) -> Case {
    Case { opts: Options { algorithm: Algorithm::Chunked { chunk }, ..c.opts }, ..c }
}

#[test]
fn chunked_gradients_over_t_b_and_chunk() {
    // T in {1, 7, 15, 16, 17, 64, 65, 300}, B in {1, 3}, chunk 16/32/64, GQA 1/2/4, h0, dht, both
    // conventions and all dtypes rotating.
    let groups = [1, 2, 4];
    let dtypes = [DType::F32, DType::BF16, DType::F16];
    let mut i = 0;
    for t in [1, 7, 15, 16, 17, 64, 65, 300] {
        for b in [1, 3] {
            let hv = 2 * groups[i % 3];
            let mut c = Case::new(b, t, 2, hv, 32, 32);
            c.dtype = dtypes[(i / 2) % 3];
            c.h0 = i % 2 == 0;
            c.seed = 500 + i as u64;
            if i % 3 == 1 {
                c = mlx(c);
            }
            let chunk = [16, 32, 64][i % 3];
            check_backward(atomic(), &bcase(chunked(c, chunk), i % 2 == 1 || i % 5 == 0));
            i += 1;
        }
    }
}

#[test]
fn chunked_gradients_with_cu_seqlens_mask_and_options() {
    let e = atomic();
    // Lengths 0, 1, 66, 5, 130: empty and single-token sequences, chunk boundaries.
    let cu = vec![0, 0, 1, 67, 72, 202];
    for (mask, h0, dht, hv, chunk, dtype) in [
        (false, true, true, 4, 64, DType::F32),
        (true, true, false, 2, 16, DType::BF16),
        (true, false, true, 8, 32, DType::F16),
    ] {
        let mut c = Case::new(1, 202, 2, hv, 32, 32);
        c.cu_seqlens = Some(cu.clone());
        c.mask = mask;
        c.h0 = h0;
        c.dtype = dtype;
        c.seed = 13;
        check_backward(e, &bcase(chunked(c.clone(), chunk), dht));
        check_backward(e, &bcase(chunked(mlx(c), chunk), dht));
    }
    // Larger head dims, bf16 upstream gradients, a mask over padded batches.
    for (k, v, chunk) in [(64, 64, 64), (128, 64, 32), (128, 128, 64), (16, 48, 16), (256, 256, 64), (192, 80, 32)] {
        let mut c = Case::new(2, 70, 1, 2, k, v);
        c.h0 = true;
        c.mask = true;
        c.dtype = DType::BF16;
        c.seed = 23;
        check_backward(e, &BCase { c: chunked(c, chunk), dht: true, do_dtype: DType::BF16 });
    }
    // Strong decay (down to 1e-4 per step) and raw keys.
    let mut c = Case::new(1, 300, 1, 2, 32, 32);
    c.logdecay = (-9.2, -0.001);
    c.normalize_k = false;
    c.h0 = true;
    check_backward(e, &bcase(chunked(c, 64), true));
}

/// The chunked backward runs its own passes (not the recurrent kernel), windows included, and is
/// bitwise repeatable: no pass accumulates with atomics.
#[test]
fn chunked_backward_runs_its_passes_and_repeats_bitwise() {
    // A small window budget forces several windows: dS crosses windows through the carry.
    let gpu = Gpu::with_options(&GpuOptions { shader_checks: checks(), ..Default::default() }).expect("a GPU adapter");
    let e = Engine::with_settings(
        gpu,
        Settings {
            poison_outputs: Some(true),
            profile: wgdelta::Profile::Passes,
            chunk_window_bytes: Some(1 << 20),
            ..Default::default()
        },
    );
    let mut c = Case::new(1, 400, 2, 4, 32, 32);
    c.cu_seqlens = Some(vec![0, 150, 150, 400]);
    c.h0 = true;
    c.mask = true;
    let b = bcase(chunked(c, 16), true);
    let d = b.c.data();
    let (d_o, dht) = upstream(&b);
    let mut first: Option<GpuGrads> = None;
    for run in 0..5 {
        let dev = d.upload(&e);
        let x = dev.inputs(b.c.cu_seqlens.as_deref());
        let (_, saved) = e.forward_train(&x, &b.c.opts).expect("forward_train");
        // The forward saved the states with windows of another size than the backward reads them
        // with (its scratch per chunk is smaller): the canonical layout of the saved states.
        let fwd_walks =
            e.last_profile().unwrap_or_default().iter().filter(|t| t.label == "wgdelta.chunk.state").count();
        e.take_profiles().expect("profiles");
        let up = e.upload("do", &d_o).expect("upload do");
        let dt = dht.as_ref().map(|t| e.upload("dht", t).expect("upload dht"));
        let gr = e.backward(&saved, &up, dt.as_ref()).expect("backward");
        let passes: Vec<&str> = e.last_profile().unwrap_or_default().iter().map(|t| t.label).collect();
        let walks = passes.iter().filter(|l| **l == "wgdelta.chunk.bwd_state").count();
        assert!(passes.contains(&"wgdelta.chunk.bwd_wy") && !passes.contains(&"wgdelta.recurrent.bwd"), "{passes:?}");
        assert!(walks > 1, "expected several windows, got {walks}");
        assert!(fwd_walks >= 1 && fwd_walks != walks, "forward windows {fwd_walks}, backward windows {walks}");
        let dl = |t: &Tensor| e.download(t).expect("download").to_f32();
        let g = vec![("dq", dl(&gr.dq)), ("dk", dl(&gr.dk)), ("dg", dl(&gr.dg)), ("dh0", dl(gr.dh0.as_ref().unwrap()))];
        match &first {
            None => {
                println!("chunked backward: {walks} windows, passes {passes:?}");
                first = Some(g);
            }
            Some(f) => {
                for ((name, a), (_, b)) in f.iter().zip(&g) {
                    assert!(a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()), "run {run}: {name} differs");
                }
            }
        }
    }
    check_backward(&e, &b);
}

#[test]
fn chunked_backward_refuses_what_it_cannot_do() {
    let e = atomic();
    // A per-key gate has no chunked form: a typed error before any GPU work.
    let mut c = chunked(Case::new(1, 20, 1, 2, 32, 32), 16);
    c.gate = GateKind::PerKey;
    let d = c.data();
    let dev = d.upload(e);
    let err = e.forward_train(&dev.inputs(None), &c.opts).expect_err("per-key gate");
    assert!(matches!(err, Error::Unsupported(_)), "{err:?}");
    // States saved at another interval cannot seed the chunked walk.
    let gpu = Gpu::with_options(&GpuOptions { shader_checks: checks(), ..Default::default() }).expect("a GPU adapter");
    let e5 = Engine::with_settings(gpu, Settings { checkpoint_every: Some(5), ..Default::default() });
    let c = chunked(Case::new(1, 20, 1, 2, 32, 32), 16);
    let d = c.data();
    let dev = d.upload(&e5);
    let err = e5.forward_train(&dev.inputs(None), &c.opts).expect_err("checkpoint interval");
    assert!(matches!(err, Error::Option { name: "checkpoint_every", .. }), "{err:?}");
}

/// Auto takes the chunked backward for a scalar gate, deterministic or not (it beats the recurrent
/// kernel at every shape measured); atomics asked for by name, or a per-key gate, keep the
/// recurrent kernel.
#[test]
fn auto_backward_is_chunked_for_a_scalar_gate() {
    let gpu = Gpu::with_options(&GpuOptions { shader_checks: checks(), ..Default::default() }).expect("a GPU adapter");
    let plain = Engine::with_settings(gpu, Settings { poison_outputs: Some(true), ..Default::default() });
    let e = &plain;
    let mut c = Case::new(1, 150, 2, 4, 32, 32);
    c.h0 = true;
    for det in [false, true] {
        c.opts.deterministic = det;
        let b = BCase { c: c.clone(), dht: true, do_dtype: DType::F32 };
        let d = b.c.data();
        let (d_o, dht) = upstream(&b);
        let (g, saved) = run_gpu(e, &b, &d, &d_o, dht.as_ref());
        assert!(g.iter().all(|(_, x)| x.iter().all(|v| v.is_finite())));
        assert_eq!(saved.chunk(), Some(64), "deterministic {det}");
        check_backward(e, &b);
    }
    let forced = cas();
    let mut per_key = c.clone();
    per_key.gate = GateKind::PerKey;
    for (e, c) in [(forced, c), (e, per_key)] {
        let b = BCase { c, dht: false, do_dtype: DType::F32 };
        let d = b.c.data();
        let (d_o, dht) = upstream(&b);
        let (_, saved) = run_gpu(e, &b, &d, &d_o, dht.as_ref());
        assert_eq!(saved.chunk(), None, "{}", b.c.label());
    }
}

/// A training loop that drops each step's results gets their buffers back for the next step
/// (fresh device memory is slow to get), and the recycled buffers hold correct results.
#[test]
fn training_steps_recycle_their_results() {
    // An engine of its own: the shared ones recycle for the tests running beside this one.
    let e = &engine_with(Accum::F32Atomic, None, false);
    let c = chunked(Case { h0: true, ..Case::new(2, 100, 2, 4, 32, 32) }, 32);
    let b = bcase(c, true);
    let d = b.c.data();
    let (d_o, dht) = upstream(&b);
    let mut kept = Vec::new();
    for step in 0..3 {
        {
            let (g, _) = run_gpu(e, &b, &d, &d_o, dht.as_ref());
            assert!(g.iter().all(|(_, x)| x.iter().all(|v| v.is_finite())), "step {step}");
        }
        kept.push(e.recycled_bytes());
        check_backward(e, &b);
    }
    println!("bytes kept for reuse after each step: {kept:?}");
    assert!(kept[0] > 0, "dropped results must be kept");
    assert_eq!(kept[1], kept[0], "the second step must reuse them, not add to them");
    e.free_recycled();
    assert_eq!(e.recycled_bytes(), 0);
}
