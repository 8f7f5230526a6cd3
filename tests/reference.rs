//! Checks of the float64 reference itself: finite differences for every gradient, chunked twin, conventions, masks.

use wgdelta::problem::{DType, GateKind, GateSpace, InputsMeta, Options, Problem, StateLayout, TensorMeta};
use wgdelta::reference::{self, chunked, chunked_backward, recurrent, RefGrads, RefInputs};

/// Finite-difference step and the relative tolerance gradients must meet (f64 central differences reach ~1e-9).
const EPS: f64 = 1e-6;
const GRAD_TOL: f64 = 1e-6;
/// Two f64 evaluations of the same math in a different order agree to rounding.
const TWIN_TOL: f64 = 1e-10;

/// SplitMix64 with Box-Muller normals: deterministic, dependency-free.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.uniform()
    }
    fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform(); // (0, 1]: keeps ln finite
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
    fn normals(&mut self, n: usize, s: f64) -> Vec<f64> {
        (0..n).map(|_| s * self.normal()).collect()
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// One configuration of options, before validation.
#[derive(Clone, Debug)]
struct Case {
    b: usize,
    t: usize,
    h: usize,
    hv: usize,
    k: usize,
    v: usize,
    per_key: bool,
    space: GateSpace,
    layout: StateLayout,
    scale: Option<f32>,
    cu: Option<Vec<i64>>,
    h0: bool,
    mask: bool,
    dht: bool,
}

impl Case {
    fn new(b: usize, t: usize, h: usize, hv: usize, k: usize, v: usize) -> Case {
        Case {
            b,
            t,
            h,
            hv,
            k,
            v,
            per_key: false,
            space: GateSpace::Log,
            layout: StateLayout::Kv,
            scale: None,
            cu: None,
            h0: false,
            mask: false,
            dht: false,
        }
    }

    fn n_seqs(&self) -> usize {
        self.cu.as_ref().map_or(self.b, |c| c.len() - 1)
    }

    fn problem(&self) -> Problem {
        let f = |s: &[usize]| Some(TensorMeta::new(s, DType::F32));
        let (b, t, n) = (self.b, self.t, self.n_seqs());
        let state = match self.layout {
            StateLayout::Kv => [n, self.hv, self.k, self.v],
            StateLayout::Vk => [n, self.hv, self.v, self.k],
        };
        let meta = InputsMeta {
            q: f(&[b, t, self.h, self.k]),
            k: f(&[b, t, self.h, self.k]),
            v: f(&[b, t, self.hv, self.v]),
            g: if self.per_key { f(&[b, t, self.hv, self.k]) } else { f(&[b, t, self.hv]) },
            beta: f(&[b, t, self.hv]),
            h0: if self.h0 { f(&state) } else { None },
            mask: self.mask.then(|| TensorMeta::new(&[b, t], DType::U8)),
            d_o: f(&[b, t, self.hv, self.v]),
            dht: if self.dht { f(&state) } else { None },
        };
        let opts = Options {
            gate_space: self.space,
            state_layout: self.layout,
            scale: self.scale,
            output_final_state: true,
            ..Options::default()
        };
        let p = Problem::new(&meta, self.cu.as_deref(), &opts, true).expect("test case must validate");
        assert_eq!(p.gate == GateKind::PerKey, self.per_key);
        p
    }

    fn label(&self) -> String {
        format!(
            "B{} T{} H{} HV{} K{} V{} {} {:?} {:?} scale={:?} cu={:?} h0={} mask={} dht={}",
            self.b,
            self.t,
            self.h,
            self.hv,
            self.k,
            self.v,
            if self.per_key { "per-key" } else { "scalar" },
            self.space,
            self.layout,
            self.scale,
            self.cu,
            self.h0,
            self.mask,
            self.dht
        )
    }
}

/// Owned inputs and upstream gradients of one case.
#[derive(Clone, Debug)]
struct Data {
    q: Vec<f64>,
    k: Vec<f64>,
    v: Vec<f64>,
    g: Vec<f64>,
    beta: Vec<f64>,
    h0: Option<Vec<f64>>,
    mask: Option<Vec<u8>>,
    d_o: Vec<f64>,
    dht: Option<Vec<f64>>,
}

impl Data {
    fn gen(c: &Case, p: &Problem, rng: &mut Rng) -> Data {
        let rows = p.dims.rows();
        let ng = reference::g_len(p);
        // Decays in (0.5, 1): strong enough to matter, far from 0 where the Linear space has a kink in log.
        let decays: Vec<f64> = (0..ng).map(|_| rng.range(0.5, 1.0)).collect();
        let g = match c.space {
            GateSpace::Log => decays.iter().map(|d| d.ln()).collect(),
            GateSpace::Linear => decays,
        };
        let mask = c.mask.then(|| {
            let mut m: Vec<u8> = (0..rows).map(|_| u8::from(rng.uniform() < 0.7)).collect();
            // At least one masked and one live token, wherever the random draw put them.
            m[rows / 2] = 0;
            m[0] = 1;
            m
        });
        Data {
            q: rng.normals(reference::qk_len(p), 1.0),
            // Keys of norm about 1 keep beta |k|^2 below 2, where the delta rule is a contraction.
            k: rng.normals(reference::qk_len(p), 1.0 / (c.k as f64).sqrt()),
            v: rng.normals(reference::v_len(p), 1.0),
            g,
            beta: (0..reference::beta_len(p)).map(|_| rng.range(0.05, 1.2)).collect(),
            h0: c.h0.then(|| rng.normals(reference::state_len(p), 0.5)),
            mask,
            d_o: rng.normals(reference::v_len(p), 1.0),
            dht: c.dht.then(|| rng.normals(reference::state_len(p), 1.0)),
        }
    }

    fn inputs(&self) -> RefInputs<'_> {
        RefInputs {
            q: &self.q,
            k: &self.k,
            v: &self.v,
            g: &self.g,
            beta: &self.beta,
            h0: self.h0.as_deref(),
            mask: self.mask.as_deref(),
        }
    }
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn norm(a: &[f64]) -> f64 {
    dot(a, a).sqrt()
}

/// `||a - b|| / ||b||` (absolute when `b` is zero).
fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let diff: f64 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum::<f64>().sqrt();
    let nb = norm(b);
    if nb > 0.0 {
        diff / nb
    } else {
        diff
    }
}

fn all_finite(a: &[f64]) -> bool {
    a.iter().all(|x| x.is_finite())
}

/// The scalar loss the gradients are of: `sum(o * do) + sum(ht * dht)`.
fn loss(p: &Problem, d: &Data) -> f64 {
    let out = reference::forward(p, &d.inputs());
    let mut l = dot(&out.o, &d.d_o);
    if let Some(dht) = &d.dht {
        l += dot(&out.ht, dht);
    }
    l
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Param {
    Q,
    K,
    V,
    G,
    Beta,
    H0,
}

const PARAMS: [Param; 6] = [Param::Q, Param::K, Param::V, Param::G, Param::Beta, Param::H0];

impl Param {
    fn slot(self, d: &mut Data) -> Option<&mut Vec<f64>> {
        match self {
            Param::Q => Some(&mut d.q),
            Param::K => Some(&mut d.k),
            Param::V => Some(&mut d.v),
            Param::G => Some(&mut d.g),
            Param::Beta => Some(&mut d.beta),
            Param::H0 => d.h0.as_mut(),
        }
    }
    fn grad(self, gr: &RefGrads) -> Option<&[f64]> {
        match self {
            Param::Q => Some(&gr.dq),
            Param::K => Some(&gr.dk),
            Param::V => Some(&gr.dv),
            Param::G => Some(&gr.dg),
            Param::Beta => Some(&gr.dbeta),
            Param::H0 => gr.dh0.as_deref(),
        }
    }
}

/// Central difference of the loss along `dir` (sparse: (index, weight) pairs) in one input.
fn fd(p: &Problem, d: &Data, param: Param, dir: &[(usize, f64)]) -> f64 {
    let shifted = |sign: f64| {
        let mut x = d.clone();
        let t = param.slot(&mut x).expect("parameter present");
        for &(i, w) in dir {
            t[i] += sign * EPS * w;
        }
        loss(p, &x)
    };
    (shifted(1.0) - shifted(-1.0)) / (2.0 * EPS)
}

/// How many entries of each tensor to check one by one.
#[derive(Clone, Copy)]
enum Entries {
    All,
    Sample(usize),
}

/// Compares `grads` with finite differences of `loss` for every input: entry by entry (all or a random
/// sample, error relative to the tensor's largest analytic entry) and along two random directions (error
/// relative to `||grad|| ||dir||`). Returns the worst error per parameter.
fn grad_errors(p: &Problem, d: &Data, grads: &RefGrads, entries: Entries, rng: &mut Rng) -> Vec<(Param, f64)> {
    let mut out = Vec::new();
    for param in PARAMS {
        let Some(an) = param.grad(grads) else {
            assert!(param != Param::H0 || !p.has_h0, "dh0 missing although h0 was given");
            continue;
        };
        let n = an.len();
        let mut probe = d.clone();
        assert_eq!(param.slot(&mut probe).map(|t| t.len()), Some(n), "{param:?}: gradient has the wrong length");
        assert!(all_finite(an), "{param:?}: non-finite gradient");
        let amax = an.iter().fold(0.0f64, |m, x| m.max(x.abs()));
        let idx: Vec<usize> = match entries {
            Entries::All => (0..n).collect(),
            Entries::Sample(s) => (0..s.min(n)).map(|_| rng.below(n)).collect(),
        };
        let mut worst = 0.0f64;
        for i in idx {
            let num = fd(p, d, param, &[(i, 1.0)]);
            let err = (num - an[i]).abs() / amax.max(1e-300);
            worst = worst.max(if amax == 0.0 && num == 0.0 { 0.0 } else { err });
        }
        for _ in 0..2 {
            let dir: Vec<(usize, f64)> = (0..n).map(|i| (i, rng.normal())).collect();
            let dvec: Vec<f64> = dir.iter().map(|x| x.1).collect();
            let num = fd(p, d, param, &dir);
            let denom = norm(an) * norm(&dvec);
            let err = (num - dot(an, &dvec)).abs() / denom.max(1e-300);
            worst = worst.max(if denom == 0.0 && num == 0.0 { 0.0 } else { err });
        }
        out.push((param, worst));
    }
    out
}

/// Runs the gradient check of one case, prints its figures and returns the worst error.
fn check_case(c: &Case, entries: Entries, seed: u64) -> f64 {
    let p = c.problem();
    let mut rng = Rng(seed);
    let d = Data::gen(c, &p, &mut rng);
    let grads = reference::backward(&p, &d.inputs(), &d.d_o, d.dht.as_deref());
    assert_eq!(grads.dh0.is_some(), c.h0);
    // Masked tokens do not exist: exactly zero gradient for everything they carry.
    if let Some(m) = &d.mask {
        let d = p.dims;
        for r in (0..d.rows()).filter(|&r| m[r] == 0) {
            let zero = |t: &[f64], w: usize| t[r * w..(r + 1) * w].iter().all(|&x| x == 0.0);
            assert!(zero(&grads.dq, d.h * d.k) && zero(&grads.dk, d.h * d.k), "masked row {r}: dq/dk not zero");
            assert!(zero(&grads.dv, d.hv * d.v) && zero(&grads.dbeta, d.hv), "masked row {r}: dv/dbeta not zero");
            assert!(zero(&grads.dg, reference::g_len(&p) / d.rows()), "masked row {r}: dg not zero");
        }
    }
    let errs = grad_errors(&p, &d, &grads, entries, &mut rng);
    let worst = errs.iter().fold(0.0f64, |m, e| m.max(e.1));
    let figures: Vec<String> = errs.iter().map(|(pr, e)| format!("{pr:?} {e:.1e}")).collect();
    println!("grad max rel err {worst:.2e} [{}]  {}", figures.join(", "), c.label());
    worst
}

fn spaces_layouts() -> [(GateSpace, StateLayout); 4] {
    [
        (GateSpace::Log, StateLayout::Kv),
        (GateSpace::Log, StateLayout::Vk),
        (GateSpace::Linear, StateLayout::Kv),
        (GateSpace::Linear, StateLayout::Vk),
    ]
}

#[test]
fn gradients_match_finite_differences_for_every_option() {
    let mut worst = 0.0f64;
    let mut idx = 0u64;
    for per_key in [false, true] {
        for (space, layout) in spaces_layouts() {
            for group in [1, 2] {
                for (h0, dht) in [(false, false), (true, false), (false, true), (true, true)] {
                    // K != V so a transposed state or swapped index shows up.
                    let mut c = Case::new(2, 4, 2 / group, 2, 16, 32);
                    c.per_key = per_key;
                    c.space = space;
                    c.layout = layout;
                    c.h0 = h0;
                    c.dht = dht;
                    c.mask = idx % 3 == 1;
                    c.scale = if idx.is_multiple_of(2) { Some(0.7) } else { None };
                    worst = worst.max(check_case(&c, Entries::Sample(10), 1000 + idx));
                    idx += 1;
                }
            }
        }
    }
    println!("every-option matrix: {idx} cases, worst rel err {worst:.2e} (tolerance {GRAD_TOL:.0e})");
    assert!(worst <= GRAD_TOL, "gradient error {worst:e} above {GRAD_TOL:e}");
}

#[test]
fn gradients_with_cu_seqlens_and_gqa4() {
    let mut worst = 0.0f64;
    let mut idx = 0u64;
    for per_key in [false, true] {
        for (space, layout) in spaces_layouts() {
            // Lengths 0, 1, 3, 0, 4: empty sequences at the start and in the middle.
            let mut c = Case::new(1, 8, 1, 4, 16, 16);
            c.cu = Some(vec![0, 0, 1, 4, 4, 8]);
            c.per_key = per_key;
            c.space = space;
            c.layout = layout;
            c.h0 = true;
            c.dht = idx.is_multiple_of(2);
            c.mask = idx % 4 < 2;
            c.scale = Some(0.45);
            worst = worst.max(check_case(&c, Entries::Sample(10), 2000 + idx));
            idx += 1;
        }
    }
    println!("cu_seqlens / GQA 4: worst rel err {worst:.2e}");
    assert!(worst <= GRAD_TOL, "gradient error {worst:e} above {GRAD_TOL:e}");
}

#[test]
fn gradients_every_entry_on_tiny_shapes() {
    // Per-key gate, Log, Vk, GQA 2, mask, h0, dht, K != V: every entry of every gradient.
    let mut a = Case::new(1, 3, 1, 2, 32, 16);
    a.per_key = true;
    a.layout = StateLayout::Vk;
    a.h0 = true;
    a.dht = true;
    a.mask = true;
    a.scale = Some(0.3);
    // Scalar gate, Linear, Kv, GQA 2, lengths 0, 1, 3 (dh0 of the empty sequence is dht), mask.
    let mut b = Case::new(1, 4, 1, 2, 16, 16);
    b.space = GateSpace::Linear;
    b.cu = Some(vec![0, 0, 1, 4]);
    b.h0 = true;
    b.dht = true;
    b.mask = true;
    b.scale = Some(1.0);
    let worst = check_case(&a, Entries::All, 7).max(check_case(&b, Entries::All, 8));
    assert!(worst <= GRAD_TOL, "gradient error {worst:e} above {GRAD_TOL:e}");
}

#[test]
fn gradient_check_detects_wrong_gradients() {
    let mut c = Case::new(1, 4, 1, 2, 16, 16);
    c.space = GateSpace::Linear;
    c.h0 = true;
    c.dht = true;
    let p = c.problem();
    let mut rng = Rng(99);
    let d = Data::gen(&c, &p, &mut rng);
    let good = reference::backward(&p, &d.inputs(), &d.d_o, d.dht.as_deref());
    let worst =
        |g: &RefGrads, rng: &mut Rng| grad_errors(&p, &d, g, Entries::All, rng).iter().fold(0.0f64, |m, e| m.max(e.1));
    let base = worst(&good, &mut rng);
    // dg taken in the wrong space (dL/dlog-decay instead of dL/d(decay)).
    let mut wrong_space = good.clone();
    for (dg, g) in wrong_space.dg.iter_mut().zip(&d.g) {
        *dg *= g;
    }
    // One entry of dk off by 1e-4 of the tensor's scale.
    let mut one_off = good.clone();
    let kmax = good.dk.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    one_off.dk[5] += 1e-4 * kmax;
    // dh0 read in the transposed layout.
    let mut transposed = good.clone();
    let p_vk = Case { layout: StateLayout::Vk, ..c.clone() }.problem();
    transposed.dh0 = good.dh0.as_ref().map(|s| reference::state_to_kv(&p_vk, s));
    let (e1, e2, e3) = (worst(&wrong_space, &mut rng), worst(&one_off, &mut rng), worst(&transposed, &mut rng));
    println!(
        "checker: correct {base:.1e}, dg in wrong space {e1:.1e}, one dk entry off {e2:.1e}, dh0 transposed {e3:.1e}"
    );
    assert!(base <= GRAD_TOL);
    assert!(e1 > 100.0 * GRAD_TOL && e2 > 10.0 * GRAD_TOL && e3 > 100.0 * GRAD_TOL, "the checker misses errors");
}

fn compare_chunked(c: &Case, chunk: usize, seed: u64) -> f64 {
    let p = c.problem();
    let d = Data::gen(c, &p, &mut Rng(seed));
    let want = reference::forward(&p, &d.inputs());
    let got = chunked::forward(&p, &d.inputs(), chunk).expect("chunked supports this case");
    assert!(all_finite(&got.o) && all_finite(&got.ht));
    let (eo, eh) = (rel_err(&got.o, &want.o), rel_err(&got.ht, &want.ht));
    println!("chunked C={chunk}: o rel err {eo:.1e}, ht rel err {eh:.1e}  {}", c.label());
    eo.max(eh)
}

/// The chunked twins' cases, (case, chunk, seed) from `seed0`: T at chunk edges (T = 1 included), both
/// spaces and layouts, h0 on and off, a scale; then packed sequences of lengths 17, 0, 1, 32, 40
/// (crossing chunk edges everywhere), GQA 2, with and without a mask. `dht` on the backward's cases.
fn twin_cases(seed0: u64, dht: bool) -> Vec<(Case, usize, u64)> {
    let mut out = Vec::new();
    let mut seed = seed0;
    for t in [1, 15, 16, 17, 40] {
        for chunk in [16, 32] {
            let mut c = Case::new(2, t, 1, 2, 32, 16);
            c.space = if seed.is_multiple_of(2) { GateSpace::Log } else { GateSpace::Linear };
            c.layout = if seed.is_multiple_of(3) { StateLayout::Vk } else { StateLayout::Kv };
            c.h0 = t != 16;
            c.dht = dht && t != 15;
            c.scale = Some(0.6);
            out.push((c, chunk, seed));
            seed += 1;
        }
    }
    for (chunk, mask, space) in [(16, false, GateSpace::Log), (32, true, GateSpace::Linear), (16, true, GateSpace::Log)]
    {
        let mut c = Case::new(1, 90, 2, 4, 16, 32);
        c.cu = Some(vec![0, 17, 17, 18, 50, 90]);
        c.space = space;
        c.layout = StateLayout::Vk;
        c.h0 = true;
        c.dht = dht;
        c.mask = mask;
        out.push((c, chunk, seed));
        seed += 1;
    }
    out
}

#[test]
fn chunked_twin_equals_token_loop() {
    let worst =
        twin_cases(300, false).iter().map(|(c, chunk, seed)| compare_chunked(c, *chunk, *seed)).fold(0.0, f64::max);
    println!("chunked twin: worst rel err {worst:.2e} (tolerance {TWIN_TOL:.0e})");
    assert!(worst <= TWIN_TOL, "chunked differs from the token loop by {worst:e}");
}

fn compare_chunked_backward(c: &Case, chunk: usize, seed: u64) -> f64 {
    let p = c.problem();
    let d = Data::gen(c, &p, &mut Rng(seed));
    let want = reference::backward(&p, &d.inputs(), &d.d_o, d.dht.as_deref());
    let got = chunked_backward::backward(&p, &d.inputs(), &d.d_o, d.dht.as_deref(), chunk)
        .expect("chunked supports this case");
    let mut errs = vec![
        ("dq", rel_err(&got.dq, &want.dq)),
        ("dk", rel_err(&got.dk, &want.dk)),
        ("dv", rel_err(&got.dv, &want.dv)),
        ("dg", rel_err(&got.dg, &want.dg)),
        ("dbeta", rel_err(&got.dbeta, &want.dbeta)),
    ];
    if let (Some(a), Some(b)) = (&got.dh0, &want.dh0) {
        errs.push(("dh0", rel_err(a, b)));
    }
    for (name, t) in [("dq", &got.dq), ("dk", &got.dk), ("dv", &got.dv), ("dg", &got.dg), ("dbeta", &got.dbeta)] {
        assert!(all_finite(t), "{name} not finite");
    }
    let worst = errs.iter().fold(0.0f64, |m, e| m.max(e.1));
    let figures: Vec<String> = errs.iter().map(|(n, e)| format!("{n} {e:.1e}")).collect();
    println!("chunked backward C={chunk}: [{}]  {}", figures.join(", "), c.label());
    worst
}

/// The chunked backward's stages give the token loop's exact gradients: chunk edges, T=1, GQA, both
/// conventions, h0/dht, packed sequences (lengths 0 and 1 included), masks.
#[test]
fn chunked_backward_twin_equals_token_loop() {
    let worst = twin_cases(900, true)
        .iter()
        .map(|(c, chunk, seed)| compare_chunked_backward(c, *chunk, *seed))
        .fold(0.0, f64::max);
    println!("chunked backward twin: worst rel err {worst:.2e} (tolerance {TWIN_TOL:.0e})");
    assert!(worst <= TWIN_TOL, "chunked backward differs from the token loop by {worst:e}");
}

#[test]
fn chunked_stages_are_consistent() {
    let chunk = 16;
    let mut c = Case::new(1, 60, 1, 2, 16, 16);
    c.cu = Some(vec![0, 5, 5, 38, 60]);
    c.h0 = true;
    let p = c.problem();
    let d = Data::gen(&c, &p, &mut Rng(5));
    let x = d.inputs();
    let spans = chunked::chunk_spans(&p, chunk);
    let lens: Vec<usize> = spans.iter().map(|s| s.len).collect();
    assert_eq!(lens, vec![5, 16, 16, 1, 16, 6]);
    let gc = chunked::chunk_local_cumsum(&p, x.g, None, chunk);
    let a_raw = chunked::scaled_dot_kkt(&p, x.k, x.beta, &gc, chunk);
    let a = chunked::solve_tril(&p, &a_raw, chunk);
    // (I + A_raw) A = I inside every chunk.
    let mut inv_err = 0.0f64;
    for sp in &spans {
        for hv in 0..p.dims.hv {
            let at = |i: usize, j: usize, m: &[f64]| m[((sp.start + i) * p.dims.hv + hv) * chunk + j];
            for i in 0..sp.len {
                for j in 0..sp.len {
                    let mut s = at(i, j, &a);
                    for m in 0..sp.len {
                        s += at(i, m, &a_raw) * at(m, j, &a);
                    }
                    inv_err = inv_err.max((s - f64::from(u8::from(i == j))).abs());
                }
            }
        }
    }
    // The per-chunk states are the token loop's checkpoints every `chunk` tokens.
    let (w, u) = chunked::recompute_w_u(&p, x.k, x.v, x.beta, &a, &gc, chunk);
    let fh = chunked::chunk_fwd_h(&p, x.k, &w, &u, &gc, x.h0, chunk);
    let ck = recurrent::checkpoints(&p, &x, chunk);
    let nb = recurrent::n_blocks(&p, chunk);
    assert_eq!(nb, 3);
    let kv = p.dims.k * p.dims.v;
    let mut h_err = 0.0f64;
    let mut block = vec![0usize; p.n_seqs()];
    for (ci, sp) in spans.iter().enumerate() {
        for hv in 0..p.dims.hv {
            let got = &fh.h[(ci * p.dims.hv + hv) * kv..][..kv];
            let want = &ck[((sp.seq * p.dims.hv + hv) * nb + block[sp.seq]) * kv..][..kv];
            h_err = h_err.max(rel_err(got, want));
        }
        block[sp.seq] += 1;
    }
    // Checkpoint blocks past a sequence's end are zero; the empty sequence has none at all.
    let seq1 = &ck[(p.dims.hv * nb) * kv..(2 * p.dims.hv * nb) * kv];
    assert!(seq1.iter().all(|&x| x == 0.0), "checkpoints of the empty sequence are not zero");
    // Its final state is h0.
    let out = reference::forward(&p, &x);
    let h0 = d.h0.as_deref().expect("h0");
    let s1 = p.dims.hv * kv;
    assert_eq!(&out.ht[s1..2 * s1], &h0[s1..2 * s1], "empty sequence must return h0");
    println!("chunked stages: (I + A_raw) A - I max {inv_err:.1e}, per-chunk state vs checkpoints rel err {h_err:.1e}");
    assert!(inv_err <= 1e-12 && h_err <= TWIN_TOL);
}

#[test]
fn chunked_refuses_what_it_cannot_do() {
    let mut c = Case::new(1, 8, 1, 1, 16, 16);
    c.per_key = true;
    let p = c.problem();
    let d = Data::gen(&c, &p, &mut Rng(1));
    assert!(chunked::forward(&p, &d.inputs(), 16).is_err(), "per-key gate must be refused");
    c.per_key = false;
    c.space = GateSpace::Linear;
    let p = c.problem();
    let mut d = Data::gen(&c, &p, &mut Rng(2));
    assert!(chunked::forward(&p, &d.inputs(), 0).is_err(), "chunk 0 must be refused");
    d.g[3] = 0.0;
    assert!(chunked::forward(&p, &d.inputs(), 16).is_err(), "a zero linear decay has no log");
    // The token loop has no such limit: a zero decay simply forgets.
    let out = reference::forward(&p, &d.inputs());
    assert!(all_finite(&out.o) && all_finite(&out.ht));
}

#[test]
fn conventions_give_the_same_answer() {
    let mut worst = 0.0f64;
    for (per_key, seed) in [(false, 11), (true, 12)] {
        let mut fla = Case::new(1, 12, 2, 4, 32, 16);
        fla.cu = Some(vec![0, 5, 5, 12]);
        fla.per_key = per_key;
        fla.h0 = true;
        fla.dht = true;
        fla.scale = Some(0.5);
        let mlx = Case { space: GateSpace::Linear, layout: StateLayout::Vk, ..fla.clone() };
        let (pf, pm) = (fla.problem(), mlx.problem());
        let df = Data::gen(&fla, &pf, &mut Rng(seed));
        // The same problem in mlx terms: decay itself, states transposed.
        let dm = Data {
            g: df.g.iter().map(|g| g.exp()).collect(),
            h0: df.h0.as_deref().map(|s| reference::state_from_kv(&pm, s)),
            dht: df.dht.as_deref().map(|s| reference::state_from_kv(&pm, s)),
            ..df.clone()
        };
        let (of, om) = (reference::forward(&pf, &df.inputs()), reference::forward(&pm, &dm.inputs()));
        let eo = rel_err(&om.o, &of.o);
        let eh = rel_err(&reference::state_to_kv(&pm, &om.ht), &of.ht);
        // Gradients: dg_log = dg_linear * decay (chain rule), dh0 transposed, the rest identical.
        let gf = reference::backward(&pf, &df.inputs(), &df.d_o, df.dht.as_deref());
        let gm = reference::backward(&pm, &dm.inputs(), &dm.d_o, dm.dht.as_deref());
        let dg_m: Vec<f64> = gm.dg.iter().zip(&dm.g).map(|(d, g)| d * g).collect();
        let dh0_m = reference::state_to_kv(&pm, gm.dh0.as_deref().expect("dh0"));
        let eg = [
            rel_err(&gm.dq, &gf.dq),
            rel_err(&gm.dk, &gf.dk),
            rel_err(&gm.dv, &gf.dv),
            rel_err(&gm.dbeta, &gf.dbeta),
            rel_err(&dg_m, &gf.dg),
            rel_err(&dh0_m, gf.dh0.as_deref().expect("dh0")),
        ]
        .iter()
        .fold(0.0f64, |m, &e| m.max(e));
        // The states must really differ in memory, or this test would not test the layout.
        assert!(rel_err(&om.ht, &of.ht) > 0.1);
        println!("conventions (per_key={per_key}): o {eo:.1e}, ht {eh:.1e}, gradients {eg:.1e}");
        worst = worst.max(eo).max(eh).max(eg);
    }
    assert!(worst <= TWIN_TOL, "conventions disagree by {worst:e}");
}

#[test]
fn mask_equals_dropping_the_tokens() {
    let mut c = Case::new(2, 7, 1, 2, 16, 16);
    c.mask = true;
    c.h0 = true;
    c.dht = true;
    c.per_key = true;
    let p = c.problem();
    let d = Data::gen(&c, &p, &mut Rng(21));
    let m = d.mask.clone().expect("mask");
    let live: Vec<usize> = (0..p.dims.rows()).filter(|&r| m[r] != 0).collect();
    let counts: Vec<usize> = (0..2).map(|b| live.iter().filter(|&&r| r / 7 == b).count()).collect();
    // Same tokens without the masked ones, packed as two variable-length sequences.
    let mut pc = Case { b: 1, t: live.len(), mask: false, ..c.clone() };
    pc.cu = Some(vec![0, counts[0] as i64, live.len() as i64]);
    let pp = pc.problem();
    let d_ = p.dims;
    let pick =
        |t: &[f64], w: usize| -> Vec<f64> { live.iter().flat_map(|&r| t[r * w..(r + 1) * w].to_vec()).collect() };
    let gw = reference::g_len(&p) / d_.rows();
    let dp = Data {
        q: pick(&d.q, d_.h * d_.k),
        k: pick(&d.k, d_.h * d_.k),
        v: pick(&d.v, d_.hv * d_.v),
        g: pick(&d.g, gw),
        beta: pick(&d.beta, d_.hv),
        mask: None,
        d_o: pick(&d.d_o, d_.hv * d_.v),
        ..d.clone()
    };
    let (om, op) = (reference::forward(&p, &d.inputs()), reference::forward(&pp, &dp.inputs()));
    let eo = rel_err(&pick(&om.o, d_.hv * d_.v), &op.o);
    let eh = rel_err(&om.ht, &op.ht);
    let zero_rows = (0..d_.rows())
        .filter(|&r| m[r] == 0)
        .all(|r| om.o[r * d_.hv * d_.v..][..d_.hv * d_.v].iter().all(|&x| x == 0.0));
    let gm = reference::backward(&p, &d.inputs(), &d.d_o, d.dht.as_deref());
    let gp = reference::backward(&pp, &dp.inputs(), &dp.d_o, dp.dht.as_deref());
    let eg = [
        rel_err(&pick(&gm.dq, d_.h * d_.k), &gp.dq),
        rel_err(&pick(&gm.dk, d_.h * d_.k), &gp.dk),
        rel_err(&pick(&gm.dv, d_.hv * d_.v), &gp.dv),
        rel_err(&pick(&gm.dg, gw), &gp.dg),
        rel_err(&pick(&gm.dbeta, d_.hv), &gp.dbeta),
        rel_err(gm.dh0.as_deref().expect("dh0"), gp.dh0.as_deref().expect("dh0")),
    ]
    .iter()
    .fold(0.0f64, |a, &e| a.max(e));
    println!(
        "mask vs dropped tokens ({} of {} masked): o {eo:.1e}, ht {eh:.1e}, grads {eg:.1e}",
        d_.rows() - live.len(),
        d_.rows()
    );
    assert!(zero_rows, "masked rows of o must be zero");
    assert!(live.len() < d_.rows() && eo.max(eh).max(eg) <= TWIN_TOL);
}

#[test]
fn gqa_equals_repeated_keys() {
    // Value head hv reads key head hv / (HV / H): contiguous groups, not interleaved. Pinned against the same
    // problem with H = HV and q, k copied out per value head, so a wrong head mapping cannot hide in a
    // forward and backward that share it.
    let mut g = Case::new(1, 6, 2, 8, 16, 16);
    g.h0 = true;
    g.dht = true;
    g.per_key = true;
    let p = g.problem();
    let d = Data::gen(&g, &p, &mut Rng(41));
    let r = Case { h: 8, ..g.clone() };
    let pr = r.problem();
    let (rows, kd, group) = (p.dims.rows(), p.dims.k, p.dims.group());
    assert_eq!(group, 4);
    let repeat = |t: &[f64]| -> Vec<f64> {
        (0..rows * 8).flat_map(|rh| t[((rh / 8) * 2 + (rh % 8) / group) * kd..][..kd].to_vec()).collect()
    };
    let dr = Data { q: repeat(&d.q), k: repeat(&d.k), ..d.clone() };
    let (og, or) = (reference::forward(&p, &d.inputs()), reference::forward(&pr, &dr.inputs()));
    let gg = reference::backward(&p, &d.inputs(), &d.d_o, d.dht.as_deref());
    let gr = reference::backward(&pr, &dr.inputs(), &dr.d_o, dr.dht.as_deref());
    // dq, dk of the shared key head are the sums over its value heads.
    let fold = |t: &[f64]| -> Vec<f64> {
        let mut out = vec![0.0; rows * 2 * kd];
        for rh in 0..rows * 8 {
            let at = ((rh / 8) * 2 + (rh % 8) / group) * kd;
            for i in 0..kd {
                out[at + i] += t[rh * kd + i];
            }
        }
        out
    };
    let e = [
        rel_err(&og.o, &or.o),
        rel_err(&og.ht, &or.ht),
        rel_err(&gg.dq, &fold(&gr.dq)),
        rel_err(&gg.dk, &fold(&gr.dk)),
        rel_err(&gg.dv, &gr.dv),
        rel_err(&gg.dg, &gr.dg),
        rel_err(&gg.dbeta, &gr.dbeta),
        rel_err(gg.dh0.as_deref().expect("dh0"), gr.dh0.as_deref().expect("dh0")),
    ];
    let worst = e.iter().fold(0.0f64, |m, &x| m.max(x));
    let figures: Vec<String> = e.iter().map(|x| format!("{x:.1e}")).collect();
    println!("GQA 4 vs repeated keys: o/ht/dq/dk/dv/dg/dbeta/dh0 rel errs [{}]", figures.join(", "));
    assert!(worst <= TWIN_TOL, "GQA mapping off by {worst:e}");
}

#[test]
fn closed_forms() {
    let mut worst = 0.0f64;
    for (per_key, space) in [(false, GateSpace::Log), (true, GateSpace::Linear)] {
        // beta = 1, unit keys, q = k, scale 1: the write makes S_t^T k_t = v_t exactly, so o_t = v_t,
        // whatever the decay and h0.
        let mut c = Case::new(1, 6, 1, 2, 16, 32);
        c.per_key = per_key;
        c.space = space;
        c.h0 = true;
        c.scale = Some(1.0);
        let p = c.problem();
        let mut d = Data::gen(&c, &p, &mut Rng(31));
        for row in d.k.chunks_exact_mut(16) {
            let n = norm(row);
            row.iter_mut().for_each(|x| *x /= n);
        }
        d.q = d.k.clone();
        d.beta.fill(1.0);
        let out = reference::forward(&p, &d.inputs());
        let e1 = rel_err(&out.o, &d.v);

        // beta = 0: no writes, S_t = (prod of decays) ∘ h0 row-wise, o_t = scale S_t^T q_t.
        let mut c = Case::new(1, 5, 1, 1, 16, 16);
        c.per_key = per_key;
        c.space = space;
        c.h0 = true;
        c.layout = StateLayout::Vk;
        c.scale = Some(0.37);
        let p = c.problem();
        let mut d = Data::gen(&c, &p, &mut Rng(32));
        d.beta.fill(0.0);
        let out = reference::forward(&p, &d.inputs());
        // The resolved scale is an f32 (0.37 is not exact in either type): the reference uses it as given.
        let scale = f64::from(p.scale);
        let h0 = d.h0.as_deref().expect("h0");
        let mut cum = [1.0f64; 16];
        let mut o_want = vec![0.0; out.o.len()];
        let mut ht_want = vec![0.0; out.ht.len()];
        for t in 0..5 {
            for (i, ci) in cum.iter_mut().enumerate() {
                let g = if per_key { d.g[t * 16 + i] } else { d.g[t] };
                *ci *= if space == GateSpace::Log { g.exp() } else { g };
            }
            for j in 0..16 {
                // Vk layout: h0[j][i].
                o_want[t * 16 + j] = scale * (0..16).map(|i| cum[i] * h0[j * 16 + i] * d.q[t * 16 + i]).sum::<f64>();
            }
        }
        for j in 0..16 {
            for i in 0..16 {
                ht_want[j * 16 + i] = cum[i] * h0[j * 16 + i];
            }
        }
        let e2 = rel_err(&out.o, &o_want).max(rel_err(&out.ht, &ht_want));
        println!("closed forms (per_key={per_key}, {space:?}): exact recall {e1:.1e}, pure decay {e2:.1e}");
        worst = worst.max(e1).max(e2);
    }
    assert!(worst <= 1e-12, "closed forms off by {worst:e}");
}
