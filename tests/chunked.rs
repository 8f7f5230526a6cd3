//! Chunked forward on the GPU against the float64 reference (and the recurrent kernel), over the
//! option matrix of issue #3, plus stage-by-stage checks of each pass against
//! `reference::chunked`. Every check prints its errors.
mod common;
use common::*;
use std::sync::OnceLock;
use wgdelta::reference::chunked as rc;
use wgdelta::*;

fn with_algo(c: &Case, algorithm: Algorithm) -> Case {
    Case { opts: Options { algorithm, ..c.opts }, ..c.clone() }
}

fn chunked(c: &Case, chunk: u32) -> Case {
    with_algo(c, Algorithm::Chunked { chunk })
}

/// Checks `c` with the chunked algorithm for each chunk size, and with the recurrent one.
fn check_both(e: &Engine, c: &Case, chunks: &[u32]) {
    for &chunk in chunks {
        check_forward(e, &chunked(c, chunk));
    }
    check_forward(e, &with_algo(c, Algorithm::Recurrent));
}

const CHUNKS: [u32; 3] = [16, 32, 64];

#[test]
fn smoke() {
    let e = engine();
    check_forward(e, &chunked(&Case::new(1, 5, 1, 1, 16, 16), 16));
    check_forward(e, &chunked(&Case::new(1, 40, 1, 1, 16, 16), 16));
    check_forward(e, &chunked(&Case { h0: true, ..Case::new(2, 9, 2, 4, 32, 32) }, 16));
}

/// T in {1, 15, 16, 17, 63, 64, 65, 200, 1000}, every chunk size, GQA 2, h0.
#[test]
fn lengths() {
    let e = engine();
    for (i, t) in [1, 15, 16, 17, 63, 64, 65, 200, 1000].into_iter().enumerate() {
        let c = Case { h0: i % 2 == 0, seed: 10 + i as u64, ..Case::new(1, t, 1, 2, 32, 32) };
        check_both(e, &c, &CHUNKS);
    }
}

/// GQA 1/2/4 x h0 on/off x both conventions, B = 2.
#[test]
fn heads_states_conventions() {
    let e = engine();
    for (gi, group) in [1, 2, 4].into_iter().enumerate() {
        for h0 in [false, true] {
            for mlx in [false, true] {
                let opts = if mlx {
                    Options { output_final_state: true, ..Options::mlx() }
                } else {
                    Case::new(1, 1, 1, 1, 16, 16).opts
                };
                let c = Case { h0, opts, seed: 100 + gi as u64, ..Case::new(2, 65, 2, 2 * group, 32, 32) };
                check_both(e, &c, &[16, 64]);
            }
        }
    }
}

/// f32, f16 and bf16 inputs (q, k, v, g and beta all in the dtype).
#[test]
fn dtypes() {
    let e = engine();
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        for mlx in [false, true] {
            let mut c = Case { dtype, h0: true, seed: 7, ..Case::new(1, 200, 2, 4, 64, 64) };
            if mlx {
                c.opts = Options { output_final_state: true, ..Options::mlx() };
            }
            check_both(e, &c, &CHUNKS);
        }
    }
}

/// Packed sequences of uneven lengths, including 0, 1 and non-multiples of the chunk.
#[test]
fn cu_seqlens() {
    let e = engine();
    let lens = [0i64, 1, 17, 0, 64, 100, 3, 130];
    let mut cu = vec![0i64];
    for l in lens {
        cu.push(cu.last().unwrap() + l);
    }
    let t = *cu.last().unwrap() as usize;
    for (i, mlx) in [false, true].into_iter().enumerate() {
        let mut c =
            Case { h0: true, cu_seqlens: Some(cu.clone()), seed: 20 + i as u64, ..Case::new(1, t, 2, 4, 32, 32) };
        if mlx {
            c.opts = Options { output_final_state: true, ..Options::mlx() };
        }
        check_both(e, &c, &CHUNKS);
    }
    let c = Case { dtype: DType::BF16, cu_seqlens: Some(cu.clone()), ..Case::new(1, t, 1, 2, 64, 32) };
    check_both(e, &c, &[64]);
}

/// Padding masks run on the chunked passes too (decay 1, beta 0, output row 0).
#[test]
fn masks() {
    let e = engine();
    check_both(e, &Case { mask: true, h0: true, ..Case::new(2, 100, 1, 2, 32, 32) }, &CHUNKS);
    let cu = vec![0i64, 30, 30, 95];
    check_both(e, &Case { mask: true, cu_seqlens: Some(cu), ..Case::new(1, 95, 2, 2, 32, 32) }, &[32]);
}

/// Decay near log 1e-4 every step for 1000 steps, and decay near 1: finite and matching.
#[test]
fn strong_and_weak_decay() {
    let e = engine();
    let strong = (1e-4f64.ln() - 0.05, 1e-4f64.ln() + 0.05);
    for (logdecay, normalize_k) in [(strong, true), ((-1e-5, 0.0), true), (strong, false), ((-1e-5, 0.0), false)] {
        for mlx in [false, true] {
            let mut c = Case { logdecay, normalize_k, h0: true, ..Case::new(1, 1000, 1, 2, 32, 32) };
            if mlx {
                c.opts = Options { output_final_state: true, ..Options::mlx() };
            }
            check_both(e, &c, &[16, 64]);
        }
    }
}

/// The production head size, K = V = 128, a few cases.
#[test]
fn head_dim_128() {
    let e = engine();
    check_both(e, &Case { h0: true, ..Case::new(1, 200, 2, 4, 128, 128) }, &[64]);
    check_both(e, &Case { dtype: DType::BF16, ..Case::new(2, 130, 1, 2, 128, 128) }, &[32, 64]);
    check_both(e, &Case { dtype: DType::F16, ..Case::new(1, 65, 1, 1, 64, 128) }, &[16]);
}

/// Head dims beyond 128, and ones that are not powers of two (the state walk stages k in slices
/// of 2048 / K rows, w in slices of 16 columns).
#[test]
fn head_dims() {
    let e = engine();
    for (i, (k, v, chunk)) in
        [(256, 32, 64), (48, 32, 64), (192, 16, 32), (16, 256, 16), (80, 48, 64)].into_iter().enumerate()
    {
        let c = Case { h0: true, seed: 40 + i as u64, ..Case::new(1, 70, 1, 2, k, v) };
        check_both(e, &c, &[chunk]);
    }
}

/// An engine whose chunked forward walks small windows of chunks (state carried between them).
fn engine_small_windows() -> &'static Engine {
    static E: OnceLock<Engine> = OnceLock::new();
    E.get_or_init(|| {
        let gpu = Gpu::with_options(&GpuOptions { shader_checks: checks(), ..Default::default() }).expect("adapter");
        let settings = Settings { poison_outputs: Some(true), chunk_window_bytes: Some(200_000), ..Default::default() };
        Engine::with_settings(gpu, settings)
    })
}

#[test]
fn windows_carry_state() {
    let e = engine_small_windows();
    check_forward(e, &chunked(&Case { h0: true, ..Case::new(3, 300, 1, 2, 32, 32) }, 16));
    let cu = vec![0i64, 0, 1, 40, 200, 203, 450];
    let c = Case { h0: true, cu_seqlens: Some(cu), ..Case::new(1, 450, 1, 2, 32, 32) };
    check_forward(e, &chunked(&c, 16));
    let no_ht = Case { opts: Options { output_final_state: false, ..c.opts }, ..c.clone() };
    check_forward(e, &chunked(&no_ht, 32));
}

/// The per-key gate is refused by `Chunked` and runs on the recurrent kernel under `Auto`.
#[test]
fn per_key_gate_routes_to_recurrent() {
    let e = engine();
    let c = Case { gate: GateKind::PerKey, ..Case::new(1, 100, 1, 2, 32, 32) };
    let d = c.data();
    let dev = d.upload(e);
    let err = e.forward(&dev.inputs(None), &chunked(&c, 64).opts).unwrap_err();
    println!("Chunked with a per-key gate: {err}");
    assert!(matches!(err, Error::Unsupported(_)));
    check_forward(e, &with_algo(&c, Algorithm::Auto));
    let p = problem(&c, &d);
    assert_eq!(ops::plan(&p, e.gpu().caps()).unwrap(), ops::Plan::Recurrent);
}

/// `Auto` follows the measured crossover (docs/PERF.md, R59): chunked where its state walk runs on
/// cooperative matrices and the longest sequence has at least `AUTO_CHUNKED_MIN_LEN` tokens, else
/// recurrent; both give the reference's answer.
#[test]
fn auto_plan() {
    let e = engine();
    let caps = e.gpu().caps();
    // Chunked only where its state walk runs on cooperative matrices (f16/bf16 inputs) and the
    // sequence reaches ops::AUTO_CHUNKED_MIN_LEN.
    let mma = caps.mma_tile().is_some();
    let long = ops::AUTO_CHUNKED_MIN_LEN;
    for (t, dtype, chunked) in [
        (1, DType::BF16, false),
        (63, DType::F32, false),
        (long, DType::F32, false),
        (long - 1, DType::BF16, false),
        (long, DType::BF16, mma),
    ] {
        let c = with_algo(&Case { dtype, ..Case::new(1, t, 1, 1, 16, 16) }, Algorithm::Auto);
        let p = problem(&c, &c.data());
        let want = if chunked { ops::Plan::Chunked { chunk: ops::AUTO_CHUNK } } else { ops::Plan::Recurrent };
        assert_eq!(ops::plan(&p, caps).unwrap(), want, "T = {t} {dtype:?}");
        check_forward(e, &c);
    }
}

/// A warm engine allocates no scratch for a repeated call of the same shape.
#[test]
fn scratch_is_pooled() {
    let gpu = Gpu::with_options(&GpuOptions { shader_checks: checks(), ..Default::default() }).expect("adapter");
    let e = Engine::with_settings(gpu, Settings { poison_outputs: Some(true), ..Default::default() });
    let c = chunked(&Case { h0: true, ..Case::new(2, 300, 2, 4, 64, 64) }, 64);
    check_forward(&e, &c);
    let first = e.scratch_bytes();
    check_forward(&e, &c);
    check_forward(&e, &c);
    let later = e.scratch_bytes();
    println!("scratch bytes (now, peak): after one call {first:?}, after three {later:?}");
    assert_eq!(first, later);
}

/// Remaps a per-chunk, C-padded scratch `[L, HV, C, X]` to the reference layout `[rows, HV, X]`.
fn unpad(s: &ops::chunked::ChunkStages, x: &[f32], rows: usize, hv: usize, c: usize, width: usize) -> Vec<f32> {
    let mut out = vec![0.0; rows * hv * width];
    for (lc, &[start, len, _]) in s.chunks.iter().enumerate() {
        for h in 0..hv {
            for i in 0..len as usize {
                let src = ((lc * hv + h) * c + i) * width;
                let dst = ((start as usize + i) * hv + h) * width;
                out[dst..dst + width].copy_from_slice(&x[src..src + width]);
            }
        }
    }
    out
}

/// Each pass's output against its float64 twin in `reference::chunked`.
fn check_stages(e: &Engine, c: &Case, chunk: u32) {
    let d = c.data();
    let dev = d.upload(e);
    let s = e.chunked_stages(&dev.inputs(c.cu_seqlens.as_deref()), &chunked(c, chunk).opts, chunk).expect("stages");
    let p = problem(c, &d);
    let (q, k, v, g, beta) = (d.q.to_f64(), d.k.to_f64(), d.v.to_f64(), d.g.to_f64(), d.beta.to_f64());
    let mask = d.mask.as_ref().map(|m| &m.bytes[..]);
    let beta: Vec<f64> = match mask {
        Some(m) => beta.iter().enumerate().map(|(i, &b)| if m[i / c.hv] != 0 { b } else { 0.0 }).collect(),
        None => beta,
    };
    let h0 = d.h0.as_ref().map(|t| t.to_f64());
    let ch = chunk as usize;
    let gc = rc::chunk_local_cumsum(&p, &g, mask, ch);
    let a_raw = rc::scaled_dot_kkt(&p, &k, &beta, &gc, ch);
    let a = rc::solve_tril(&p, &a_raw, ch);
    let (w, u) = rc::recompute_w_u(&p, &k, &v, &beta, &a, &gc, ch);
    let fh = rc::chunk_fwd_h(&p, &k, &w, &u, &gc, h0.as_deref(), ch);
    let rows = c.b * c.t;
    let errs = [
        ("gc", rel_err(&unpad(&s, &s.gc, rows, c.hv, ch, 1), &gc)),
        ("beta", rel_err(&unpad(&s, &s.beta, rows, c.hv, ch, 1), &beta)),
        ("A", rel_err(&unpad(&s, &s.a, rows, c.hv, ch, ch), &a)),
        ("w", rel_err(&unpad(&s, &s.w, rows, c.hv, ch, c.k), &w)),
        ("u", rel_err(&unpad(&s, &s.u, rows, c.hv, ch, c.v), &u)),
        ("v_new", rel_err(&unpad(&s, &s.v_new, rows, c.hv, ch, c.v), &fh.v_new)),
        ("h", rel_err(&s.h[..fh.h.len()], &fh.h)),
    ];
    // chunk_wu.wgsl's f16 operands of the cooperative-matrix walk: -w rounded to nearest even (bit
    // for bit against the `half` crate, from the pass's own f32 w), and K ∘ exp(gc_last - gc).
    let (hv, kdim) = (c.hv, c.k);
    let mut kd_ref = vec![0.0f64; s.wk16.len() / 2];
    let mut kd_got = vec![0.0f32; s.wk16.len() / 2];
    for (lc, &[start, len, _]) in s.chunks.iter().enumerate() {
        for h in 0..hv {
            let plane = (lc * hv + h) * 2 * ch * kdim;
            let last = start as usize + len as usize - 1;
            for i in 0..ch {
                for m in 0..kdim {
                    let at = (lc * hv + h) * ch * kdim + i * kdim + m;
                    let w16 = s.wk16[plane + i * kdim + m];
                    let want = half::f16::from_f32(-s.w[at]).to_bits();
                    assert_eq!(w16, want, "{}: -w as f16 at chunk {lc} head {h} ({i}, {m})", c.label());
                    kd_got[at] = half::f16::from_bits(s.wk16[plane + ch * kdim + i * kdim + m]).to_f32();
                    if i < len as usize {
                        let row = start as usize + i;
                        let kk = k[(row * c.h + h / (hv / c.h)) * kdim + m];
                        kd_ref[at] = kk * (gc[last * hv + h] - gc[row * hv + h]).exp();
                    }
                }
            }
        }
    }
    let ekd = rel_err(&kd_got, &kd_ref);
    assert!(ekd <= 2e-3, "{}: K ∘ decay as f16 off by {ekd:.2e}", c.label());

    // The cooperative-matrix output pass's f16 operands: q (made wherever the stages are recorded) and
    // k^T (with that pass, plane 1 as [K][C]) as the inputs rounded to f16, and S, v_new as the walk's
    // own f32 values rounded to f16.
    if let Some(qk16) = &s.qk16 {
        let f = |b: u16| half::f16::from_bits(b).to_f32();
        // (exact but for inputs below f16's normal range)
        let ok = |got: u16, want: f64| (f(got) as f64 - want).abs() <= 6e-8 + 1e-3 * want.abs();
        let with_k = s.out16.is_some();
        for (lc, &[start, len, _]) in s.chunks.iter().enumerate() {
            for hk in 0..c.h {
                for i in 0..ch {
                    for m in 0..kdim {
                        let at = ((lc * c.h + hk) * 2 * ch + i) * kdim + m;
                        let at_k = ((lc * c.h + hk) * 2 * ch + ch) * kdim + m * ch + i;
                        let (wq, wk) = if i < len as usize {
                            let x = ((start as usize + i) * c.h + hk) * kdim + m;
                            (q[x], k[x])
                        } else {
                            (0.0, 0.0)
                        };
                        assert!(
                            ok(qk16[at], wq) && (!with_k || ok(qk16[at_k], wk)),
                            "{}: q, k as f16 at chunk {lc} head {hk} ({i}, {m})",
                            c.label()
                        );
                    }
                }
            }
        }
    }
    if let Some([h16, vn16]) = &s.out16 {
        let f = |b: u16| half::f16::from_bits(b).to_f32();
        let near = |got: u16, want: f32| (f(got) - want).abs() <= 1e-3 * want.abs().max(1e-2);
        let nh = s.h.len().min(h16.len());
        let bad_h = (0..nh).filter(|&i| !near(h16[i], s.h[i])).count();
        let bad_vn = (0..s.v_new.len()).filter(|&i| !near(vn16[i], s.v_new[i])).count();
        println!(
            "f16 operands of the output pass: {bad_h} of {nh} of h16 and {bad_vn} of {} of vn16 off",
            s.v_new.len()
        );
        assert!(bad_h == 0 && bad_vn == 0, "{}: h16 or vn16 differ from h, v_new", c.label());
    }

    let o = e.download(&s.out.o).unwrap().to_f32();
    let mut o_ref = rc::chunk_fwd_o(&p, &q, &k, &fh.v_new, &fh.h, &gc, ch);
    if let Some(m) = mask {
        for (r, row) in o_ref.chunks_mut(c.hv * c.v).enumerate() {
            if m[r] == 0 {
                row.fill(0.0);
            }
        }
    }
    let eo = rel_err(&o, &o_ref);
    let tol = fwd_tol(c.dtype);
    if eo.is_nan() || eo > tol {
        // Where the output is off: (row, value head, column) of the first elements.
        let bad: Vec<String> = (0..o.len())
            .filter(|&i| {
                let d = (o[i] as f64 - o_ref[i]).abs();
                d.is_nan() || d > 0.1 * (1.0 + o_ref[i].abs())
            })
            .take(12)
            .map(|i| format!("({}, {}, {}): {} vs {:.4}", i / (c.hv * c.v), i / c.v % c.hv, i % c.v, o[i], o_ref[i]))
            .collect();
        println!("o off at {bad:?}");
    }
    print!("stages C={chunk:<2} {:<100} kd16 {ekd:.1e}", c.label());
    for (n, x) in errs.iter().chain([("o", eo)].iter()) {
        print!(" {n} {x:.1e}");
    }
    println!();
    for (n, x) in errs.iter().chain([("o", eo)].iter()) {
        assert!(*x <= tol, "{}: stage {n} error {x:.3e} above {tol:.0e}", c.label());
    }
}

#[test]
fn stages() {
    let e = engine();
    for chunk in CHUNKS {
        check_stages(e, &Case { h0: true, ..Case::new(1, 100, 1, 2, 32, 32) }, chunk);
    }
    let cu = vec![0i64, 5, 5, 70, 90];
    check_stages(e, &Case { mask: true, h0: true, cu_seqlens: Some(cu), ..Case::new(1, 90, 2, 4, 32, 16) }, 16);
    let mlx = Options { output_final_state: true, ..Options::mlx() };
    check_stages(e, &Case { opts: mlx, dtype: DType::BF16, ..Case::new(2, 70, 1, 1, 64, 64) }, 64);
}

/// The perf shape (bf16, H=16, HV=32, K=V=128, B=1, T=16384, chunk 64): chunked against
/// recurrent on the same device. Needs bindings above llvmpipe's 128 MiB: run on a real GPU with
/// `cargo test --release --test chunked production_shape -- --ignored --nocapture`.
#[test]
#[ignore]
fn production_shape() {
    let e = engine();
    let c = Case { dtype: DType::BF16, h0: true, ..Case::new(1, 16384, 16, 32, 128, 128) };
    let d = c.data();
    let dev = d.upload(e);
    let run = |algorithm| {
        let t0 = std::time::Instant::now();
        let out = e.forward(&dev.inputs(None), &Options { algorithm, ..c.opts }).expect("forward");
        let o = e.download(&out.o).unwrap().to_f32();
        let ht = e.download(out.ht.as_ref().unwrap()).unwrap().to_f32();
        println!("{algorithm:?}: {:.1} ms (with readback)", t0.elapsed().as_secs_f64() * 1e3);
        (o, ht)
    };
    let (o_r, ht_r) = run(Algorithm::Recurrent);
    let (o_c, ht_c) = run(Algorithm::Chunked { chunk: 64 });
    let wide = |x: &[f32]| x.iter().map(|&v| v as f64).collect::<Vec<_>>();
    let (eo, eh) = (rel_err(&o_c, &wide(&o_r)), rel_err(&ht_c, &wide(&ht_r)));
    println!("chunked vs recurrent: o {eo:.2e}, ht {eh:.2e}; scratch (now, peak) {:?}", e.scratch_bytes());
    assert!(eo < 1e-3 && eh < 1e-3);
}

/// Per-pass GPU times of the chunked forward against the recurrent kernel (a rough guide on the
/// software driver; `--ignored --nocapture`).
#[test]
#[ignore]
fn profile_passes() {
    let gpu = Gpu::with_options(&GpuOptions::default()).expect("adapter");
    let e = Engine::with_settings(gpu, Settings { profile: wgdelta::Profile::Passes, ..Default::default() });
    let c = Case { dtype: DType::BF16, ..Case::new(1, 2048, 2, 4, 128, 128) };
    let d = c.data();
    let dev = d.upload(&e);
    for algorithm in [Algorithm::Recurrent, Algorithm::Chunked { chunk: 64 }, Algorithm::Chunked { chunk: 32 }] {
        for _ in 0..2 {
            let out = e.forward(&dev.inputs(None), &Options { algorithm, ..c.opts }).expect("forward");
            e.download(&out.o).unwrap();
        }
        let prof = e.last_profile().unwrap_or_default();
        let total: f64 = prof.iter().map(|p| p.ns).sum();
        let mut by: Vec<(&str, f64)> = Vec::new();
        for p in &prof {
            match by.iter_mut().find(|(l, _)| *l == p.label) {
                Some(x) => x.1 += p.ns,
                None => by.push((p.label, p.ns)),
            }
        }
        let parts: Vec<String> = by.iter().map(|(l, ns)| format!("{l} {:.1} ms", ns / 1e6)).collect();
        println!("{algorithm:?}: {:.1} ms  [{}]", total / 1e6, parts.join(", "));
    }
}
