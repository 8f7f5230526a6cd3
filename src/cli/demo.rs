//! The demo (`wgdelta` with no arguments): a Qwen3.5-sized linear-attention call on the default
//! adapter, checked against the float64 reference on a slice, with time and throughput.

use std::time::Instant;
use wgdelta::problem::{InputsMeta, TensorMeta};
use wgdelta::reference::{self, RefInputs};
use wgdelta::synth::model_like;
use wgdelta::{DType, Dims, Engine, GateSpace, Options, Problem, Settings, StateLayout};

#[derive(clap::Args, Clone, Debug)]
pub struct DemoArgs {
    /// Tokens (default 4096 on a GPU, 256 on a software adapter).
    #[arg(long)]
    pub t: Option<usize>,
    /// Input dtype: f32, f16 or bf16.
    #[arg(long, default_value = "bf16")]
    pub dtype: String,
}

impl Default for DemoArgs {
    fn default() -> Self {
        DemoArgs { t: None, dtype: "bf16".into() }
    }
}

pub fn parse_dtype(s: &str) -> wgdelta::Result<DType> {
    match s.to_lowercase().as_str() {
        "f32" => Ok(DType::F32),
        "f16" => Ok(DType::F16),
        "bf16" => Ok(DType::BF16),
        _ => Err(wgdelta::Error::Option { name: "dtype", why: format!("`{s}`: expected f32, f16 or bf16") }),
    }
}

pub fn run(a: &DemoArgs) -> wgdelta::Result<()> {
    let dtype = parse_dtype(&a.dtype)?;
    let gpu = wgdelta::Gpu::new()?;
    let info = gpu.adapter_info().clone();
    let software = info.device_type == wgpu::DeviceType::Cpu;
    let eng = Engine::with_settings(gpu, Settings { profile: wgdelta::Profile::Passes, ..Default::default() });
    let t = a.t.unwrap_or(if software { 256 } else { 4096 });
    let d = Dims { b: 1, t, h: 16, hv: 32, k: 128, v: 128 };
    println!("wgdelta demo: gated delta rule, Qwen3.5 linear-attention shape");
    println!(
        "  adapter  {} ({:?}, {:?}){}",
        info.name,
        info.backend,
        info.device_type,
        if software { " — software driver" } else { "" }
    );
    println!("  shape    B={} T={} H={} HV={} K={} V={}, {dtype} inputs, h0 in, ht out", d.b, d.t, d.h, d.hv, d.k, d.v);
    let host = model_like(d, dtype, GateSpace::Log, StateLayout::Kv, true, 7);
    let dev = host.upload(&eng)?;
    let opts = Options { output_final_state: true, ..Options::default() };
    // First call compiles the pipelines; time the second.
    eng.forward(&dev.inputs(), &opts)?;
    eng.sync()?;
    let t0 = Instant::now();
    let out = eng.forward(&dev.inputs(), &opts)?;
    eng.sync()?;
    let wall = t0.elapsed().as_secs_f64();
    let gpu_s = eng.last_profile().map(|p| p.iter().map(|x| x.ns).sum::<f64>() * 1e-9);
    let o = eng.download(&out.o)?.to_f32();

    // Reference on a slice: key head 0 and its value heads, all tokens.
    let grp = d.hv / d.h;
    let take = |x: &[f64], heads: usize, width: usize, h0: usize, n: usize| -> Vec<f64> {
        x.chunks(heads * width).flat_map(|row| row[h0 * width..(h0 + n) * width].to_vec()).collect()
    };
    let q = take(&host.q.to_f64(), d.h, d.k, 0, 1);
    let k = take(&host.k.to_f64(), d.h, d.k, 0, 1);
    let v = take(&host.v.to_f64(), d.hv, d.v, 0, grp);
    let g = take(&host.g.to_f64(), d.hv, 1, 0, grp);
    let beta = take(&host.beta.to_f64(), d.hv, 1, 0, grp);
    let h0 = take(&host.h0.as_ref().map(|h| h.to_f64()).unwrap_or_default(), d.hv, d.k * d.v, 0, grp);
    let f = |s: &[usize]| Some(TensorMeta::new(s, DType::F32));
    let meta = InputsMeta {
        q: f(&[1, t, 1, d.k]),
        k: f(&[1, t, 1, d.k]),
        v: f(&[1, t, grp, d.v]),
        g: f(&[1, t, grp]),
        beta: f(&[1, t, grp]),
        h0: f(&[1, grp, d.k, d.v]),
        ..Default::default()
    };
    let p = Problem::new(&meta, None, &opts, false)?;
    let r = reference::forward(&p, &RefInputs { q: &q, k: &k, v: &v, g: &g, beta: &beta, h0: Some(&h0), mask: None });
    let got = take(&o.iter().map(|&x| x as f64).collect::<Vec<_>>(), d.hv, d.v, 0, grp);
    let num: f64 = got.iter().zip(&r.o).map(|(a, b)| (a - b).powi(2)).sum();
    let den: f64 = r.o.iter().map(|b| b * b).sum();
    let err = (num / den).sqrt();
    let tol = if dtype == DType::F32 { 1e-4 } else { 2e-2 };
    let ok = err.is_finite() && err <= tol;

    let toks = (d.b * d.t) as f64;
    println!(
        "  time     {:.3} ms wall{}",
        wall * 1e3,
        gpu_s.map(|g| format!(", {:.3} ms GPU (timestamps)", g * 1e3)).unwrap_or_default()
    );
    println!("  speed    {:.0} tokens/s", toks / gpu_s.unwrap_or(wall));
    println!("  check    key head 0 ({grp} value heads, {} tokens) vs float64 reference: rel. error {err:.2e} (tol {tol:.0e}) {}", t, if ok { "OK" } else { "FAILED" });
    if ok {
        Ok(())
    } else {
        Err(wgdelta::Error::Check(format!("demo result differs from the reference by {err:.3e}")))
    }
}
