//! Shared test harness: seeded random cases, GPU vs float64 reference, relative-error checks.
#![allow(dead_code)]

use std::sync::OnceLock;
use wgdelta::reference::{self, RefInputs};
use wgdelta::*;

/// Shader bounds checks in tests: on, unless `WGDELTA_SHADER_CHECKS` says otherwise (to run a test
/// binary on a GPU as production runs).
pub fn checks() -> Option<bool> {
    std::env::var_os(wgdelta::device::ENV_SHADER_CHECKS).is_none().then_some(true)
}

/// One engine per test binary (pipelines compile once). Shader bounds checks (see [`checks`]) and
/// output poisoning are on in test builds.
pub fn engine() -> &'static Engine {
    static E: OnceLock<Engine> = OnceLock::new();
    E.get_or_init(|| {
        let gpu = Gpu::with_options(&GpuOptions { shader_checks: checks(), ..Default::default() })
            .expect("a GPU adapter (install mesa-vulkan-drivers for the software one)");
        let info = gpu.adapter_info();
        eprintln!("test adapter: {} ({:?}), caps {:?}", info.name, info.backend, gpu.caps());
        Engine::with_settings(gpu, Settings { poison_outputs: Some(true), ..Default::default() })
    })
}

/// An engine without subgroups (the workgroup-memory fallback everywhere).
pub fn engine_no_subgroups() -> &'static Engine {
    static E: OnceLock<Engine> = OnceLock::new();
    E.get_or_init(|| {
        let gpu = Gpu::with_options(&GpuOptions {
            shader_checks: checks(),
            disable_features: wgpu::Features::SUBGROUP,
            ..Default::default()
        })
        .expect("a GPU adapter");
        Engine::with_settings(gpu, Settings { poison_outputs: Some(true), ..Default::default() })
    })
}

/// Relative error ‖a − b‖ / ‖b‖ (b the reference); infinite if `a` has a NaN or Inf.
pub fn rel_err(a: &[f32], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    if a.iter().any(|x| !x.is_finite()) {
        return f64::INFINITY;
    }
    let num: f64 = a.iter().zip(b).map(|(&x, &y)| (x as f64 - y).powi(2)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    if den == 0.0 {
        return num.sqrt();
    }
    (num / den).sqrt()
}

/// SPEC tolerance for the forward.
pub fn fwd_tol(dt: DType) -> f64 {
    if dt == DType::F32 {
        1e-4
    } else {
        2e-2
    }
}

/// A forward case: shapes, options and input ranges; built into host data by [`Case::data`].
#[derive(Clone, Debug)]
pub struct Case {
    pub b: usize,
    pub t: usize,
    pub h: usize,
    pub hv: usize,
    pub k: usize,
    pub v: usize,
    pub dtype: DType,
    pub gate: GateKind,
    pub opts: Options,
    pub h0: bool,
    pub mask: bool,
    pub cu_seqlens: Option<Vec<i64>>,
    /// L2-normalise key rows (as models do); otherwise keys are raw N(0, 1/K).
    pub normalize_k: bool,
    /// Range of the log-decay; the linear gate gets exp of it.
    pub logdecay: (f64, f64),
    pub seed: u64,
}

impl Case {
    pub fn new(b: usize, t: usize, h: usize, hv: usize, k: usize, v: usize) -> Self {
        Case {
            b,
            t,
            h,
            hv,
            k,
            v,
            dtype: DType::F32,
            gate: GateKind::Scalar,
            opts: Options { output_final_state: true, ..Options::default() },
            h0: false,
            mask: false,
            cu_seqlens: None,
            normalize_k: true,
            logdecay: (-0.7, -0.01),
            seed: 1,
        }
    }
    pub fn n_seqs(&self) -> usize {
        self.cu_seqlens.as_ref().map(|c| c.len() - 1).unwrap_or(self.b)
    }
    pub fn state_shape(&self) -> [usize; 4] {
        match self.opts.state_layout {
            StateLayout::Kv => [self.n_seqs(), self.hv, self.k, self.v],
            StateLayout::Vk => [self.n_seqs(), self.hv, self.v, self.k],
        }
    }
    pub fn label(&self) -> String {
        format!(
            "{:?} B={} T={} H={} HV={} K={} V={} {:?} {:?} {:?}/{:?} h0={} mask={} cu={:?}",
            self.opts.algorithm,
            self.b,
            self.t,
            self.h,
            self.hv,
            self.k,
            self.v,
            self.dtype,
            self.gate,
            self.opts.gate_space,
            self.opts.state_layout,
            self.h0,
            self.mask,
            self.cu_seqlens
        )
    }

    /// Host inputs, rounded to their dtype (so the reference sees exactly what the GPU sees).
    pub fn data(&self) -> CaseData {
        let mut rng = Rng::new(self.seed);
        let (b, t, h, hv, k, v) = (self.b, self.t, self.h, self.hv, self.k, self.v);
        let q = rng.normals(b * t * h * k);
        let mut kk: Vec<f64> = rng.normals(b * t * h * k).iter().map(|x| x / (k as f64).sqrt()).collect();
        if self.normalize_k {
            wgdelta::synth::normalize_rows(&mut kk, k);
        }
        let vv = rng.normals(b * t * hv * v);
        let gshape: Vec<usize> = match self.gate {
            GateKind::Scalar => vec![b, t, hv],
            GateKind::PerKey => vec![b, t, hv, k],
        };
        let gn: usize = gshape.iter().product();
        let logd = rng.uniforms(gn, self.logdecay.0, self.logdecay.1);
        let g: Vec<f64> = match self.opts.gate_space {
            GateSpace::Log => logd,
            GateSpace::Linear => logd.iter().map(|x| x.exp()).collect(),
        };
        let beta = rng.uniforms(b * t * hv, 0.0, 1.0);
        let sshape = self.state_shape();
        let h0 = self.h0.then(|| rng.normals(sshape.iter().product()).iter().map(|x| 0.5 * x).collect::<Vec<_>>());
        let mask =
            self.mask.then(|| (0..b * t).map(|i| if (i * 7 + 3) % 5 == 0 { 0u8 } else { 1u8 }).collect::<Vec<u8>>());
        let rt = |shape: &[usize], x: &[f64], dt: DType| HostTensor::from_f64(shape, x, dt);
        let q = rt(&[b, t, h, k], &q, self.dtype);
        let kk = rt(&[b, t, h, k], &kk, self.dtype);
        let vv = rt(&[b, t, hv, v], &vv, self.dtype);
        let g = rt(&gshape, &g, self.dtype);
        let beta = rt(&[b, t, hv], &beta, self.dtype);
        let h0 = h0.map(|x| rt(&sshape, &x, DType::F32));
        let mask = mask.map(|m| HostTensor { shape: vec![b, t], dtype: DType::U8, bytes: m });
        CaseData { q, k: kk, v: vv, g, beta, h0, mask }
    }
}

/// Host inputs of a case.
#[derive(Clone, Debug)]
pub struct CaseData {
    pub q: HostTensor,
    pub k: HostTensor,
    pub v: HostTensor,
    pub g: HostTensor,
    pub beta: HostTensor,
    pub h0: Option<HostTensor>,
    pub mask: Option<HostTensor>,
}

/// A case's inputs widened to float64, owned, for the reference.
pub struct RefData {
    pub q: Vec<f64>,
    pub k: Vec<f64>,
    pub v: Vec<f64>,
    pub g: Vec<f64>,
    pub beta: Vec<f64>,
    pub h0: Option<Vec<f64>>,
    pub mask: Option<Vec<u8>>,
}

impl RefData {
    /// Borrowed as the reference's inputs.
    pub fn inputs(&self) -> RefInputs<'_> {
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

impl CaseData {
    /// The inputs exactly as the GPU sees them (already rounded to their dtype), in float64.
    pub fn to_f64(&self) -> RefData {
        RefData {
            q: self.q.to_f64(),
            k: self.k.to_f64(),
            v: self.v.to_f64(),
            g: self.g.to_f64(),
            beta: self.beta.to_f64(),
            h0: self.h0.as_ref().map(|t| t.to_f64()),
            mask: self.mask.as_ref().map(|m| m.bytes.clone()),
        }
    }
}

/// Device copies of a case's inputs.
pub struct DevData {
    pub q: Tensor,
    pub k: Tensor,
    pub v: Tensor,
    pub g: Tensor,
    pub beta: Tensor,
    pub h0: Option<Tensor>,
    pub mask: Option<Tensor>,
}

impl CaseData {
    pub fn upload(&self, e: &Engine) -> DevData {
        let u = |n: &str, t: &HostTensor| e.upload(n, t).expect("upload");
        DevData {
            q: u("q", &self.q),
            k: u("k", &self.k),
            v: u("v", &self.v),
            g: u("g", &self.g),
            beta: u("beta", &self.beta),
            h0: self.h0.as_ref().map(|t| u("h0", t)),
            mask: self.mask.as_ref().map(|t| u("mask", t)),
        }
    }
}

impl DevData {
    pub fn inputs<'a>(&'a self, cu: Option<&'a [i64]>) -> Inputs<'a> {
        Inputs {
            q: &self.q,
            k: &self.k,
            v: &self.v,
            g: &self.g,
            beta: &self.beta,
            h0: self.h0.as_ref(),
            mask: self.mask.as_ref(),
            cu_seqlens: cu,
        }
    }
}

/// The validated problem of a case (for the reference).
pub fn problem(c: &Case, d: &CaseData) -> Problem {
    let meta = problem::InputsMeta {
        q: Some(d.q.meta()),
        k: Some(d.k.meta()),
        v: Some(d.v.meta()),
        g: Some(d.g.meta()),
        beta: Some(d.beta.meta()),
        h0: d.h0.as_ref().map(|t| t.meta()),
        mask: d.mask.as_ref().map(|t| t.meta()),
        d_o: None,
        dht: None,
    };
    Problem::new(&meta, c.cu_seqlens.as_deref(), &c.opts, false).expect("valid case")
}

/// The float64 reference forward of a case.
pub fn reference_forward(c: &Case, d: &CaseData) -> reference::RefOutputs {
    let p = problem(c, d);
    let wide = d.to_f64();
    let x = wide.inputs();
    reference::forward(&p, &x)
}

/// Runs a case on the GPU and the reference; returns (o error, ht error) and prints them.
pub fn check_forward(e: &Engine, c: &Case) -> (f64, f64) {
    let d = c.data();
    let dev = d.upload(e);
    let out =
        e.forward(&dev.inputs(c.cu_seqlens.as_deref()), &c.opts).unwrap_or_else(|err| panic!("{}: {err}", c.label()));
    let o = e.download(&out.o).expect("download o").to_f32();
    let r = reference_forward(c, &d);
    let eo = rel_err(&o, &r.o);
    let eh = match &out.ht {
        Some(ht) => rel_err(&e.download(ht).expect("download ht").to_f32(), &r.ht),
        None => 0.0,
    };
    let tol = fwd_tol(c.dtype);
    println!("{:<110} o {eo:.2e}  ht {eh:.2e}  (tol {tol:.0e})", c.label());
    assert!(eo <= tol && eh <= tol, "{}: o err {eo:.3e}, ht err {eh:.3e} above {tol:.0e}", c.label());
    (eo, eh)
}

// ---------------------------------------------------------------------------------------------
// Issue-2 suite helpers (forward / decode / errors / naga tests).
// ---------------------------------------------------------------------------------------------

/// An engine on its own device with a forced recurrent tiling (checked shaders, poisoned outputs).
/// `subgroups = false` opens the device without the SUBGROUP feature.
pub fn engine_with_tiles(tiles: Option<wgdelta::kernels::recurrent::Tiles>, subgroups: bool) -> Engine {
    let disable = if subgroups { wgpu::Features::empty() } else { wgpu::Features::SUBGROUP };
    let gpu =
        Gpu::with_options(&GpuOptions { shader_checks: checks(), disable_features: disable, ..Default::default() })
            .expect("a GPU adapter");
    Engine::with_settings(gpu, Settings { poison_outputs: Some(true), recurrent_tiles: tiles, ..Default::default() })
}

/// GPU forward of a case against the float64 reference, without asserting: `(o error, ht error)`.
/// The ht error is `None` when the case does not ask for the final state (and then the engine must
/// not return one). Device or validation errors are returned as such.
pub fn forward_errors(e: &Engine, c: &Case) -> Result<(f64, Option<f64>)> {
    let d = c.data();
    forward_errors_with(e, c, &d)
}

/// [`forward_errors`] on given host data (for cases whose data the test altered).
pub fn forward_errors_with(e: &Engine, c: &Case, d: &CaseData) -> Result<(f64, Option<f64>)> {
    let dev = d.upload(e);
    let out = e.forward(&dev.inputs(c.cu_seqlens.as_deref()), &c.opts)?;
    let o = e.download(&out.o)?.to_f32();
    let r = reference_forward(c, d);
    let eo = rel_err(&o, &r.o);
    let eh = match &out.ht {
        Some(ht) => {
            assert!(c.opts.output_final_state, "{}: ht returned without output_final_state", c.label());
            assert_eq!(ht.shape(), &c.state_shape()[..], "{}: ht shape", c.label());
            Some(rel_err(&e.download(ht)?.to_f32(), &r.ht))
        }
        None => {
            assert!(!c.opts.output_final_state, "{}: output_final_state set but no ht returned", c.label());
            None
        }
    };
    Ok((eo, eh))
}

/// Runs every case, prints its error figures, and fails at the end listing every case above the
/// SPEC tolerance (NaN/Inf count as infinite error). `tag` prefixes the printed lines.
pub fn check_all(e: &Engine, tag: &str, cases: &[Case]) {
    let mut bad = Vec::new();
    for c in cases {
        let tol = fwd_tol(c.dtype);
        let t0 = std::time::Instant::now();
        let res = forward_errors(e, c);
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        match res {
            Ok((eo, eh)) => {
                let ehs = eh.map(|x| format!("{x:.2e}")).unwrap_or_else(|| "-".into());
                let ok = eo <= tol && eh.is_none_or(|x| x <= tol);
                println!(
                    "[{tag}] {:<120} o {eo:.2e}  ht {ehs:>8}  tol {tol:.0e} {:>6.0} ms {}",
                    c.label(),
                    ms,
                    if ok { "" } else { "FAIL" }
                );
                if !ok {
                    bad.push(format!("{}: o {eo:.3e} ht {ehs}", c.label()));
                }
            }
            Err(err) => {
                println!("[{tag}] {:<120} ERROR {err}", c.label());
                bad.push(format!("{}: error {err}", c.label()));
            }
        }
    }
    assert!(bad.is_empty(), "[{tag}] {} of {} cases failed:\n{}", bad.len(), cases.len(), bad.join("\n"));
}

/// Tokens `t0..t1` of every batch row of a `[B, T, ...]` host tensor (any dtype).
pub fn slice_tokens(x: &HostTensor, t0: usize, t1: usize) -> HostTensor {
    let (b, t) = (x.shape[0], x.shape[1]);
    assert!(t0 <= t1 && t1 <= t);
    let row: usize = x.shape[2..].iter().product::<usize>() * x.dtype.size();
    let mut bytes = Vec::with_capacity(b * (t1 - t0) * row);
    for bi in 0..b {
        bytes.extend_from_slice(&x.bytes[(bi * t + t0) * row..(bi * t + t1) * row]);
    }
    let mut shape = x.shape.clone();
    shape[1] = t1 - t0;
    HostTensor { shape, dtype: x.dtype, bytes }
}

/// The same host values in another float dtype (exact when widening).
pub fn recast(x: &HostTensor, dtype: DType) -> HostTensor {
    HostTensor::from_f64(&x.shape, &x.to_f64(), dtype)
}
