//! `wgdelta bench`: GPU time from timestamp queries (median of many runs after warm-up) and wall
//! time per call, with tokens/s, achieved GB/s and TFLOP/s beside the floors.

use super::demo::parse_dtype;
use std::time::Instant;
use wgdelta::kernels::recurrent::Tiles;
use wgdelta::kernels::Reduce;
use wgdelta::ops::cost::{self, Cost};
use wgdelta::synth::model_like;
use wgdelta::{Algorithm, DType, Dims, Engine, GateSpace, Gpu, Options, Problem, Settings, StateLayout};

#[derive(clap::Args, Clone, Debug)]
pub struct BenchArgs {
    /// Which sweep: decode, prefill, chunked, crossover, train, train-step, train-crossover, all.
    #[arg(long, default_value = "all")]
    pub preset: String,
    /// Timed runs per case (after warm-up).
    #[arg(long, default_value_t = 50)]
    pub runs: usize,
    #[arg(long, default_value_t = 5)]
    pub warmup: usize,
    /// Memory bandwidth for the floor (GB/s, bytes read + written); default: known H100/H200 figures.
    #[arg(long)]
    pub bandwidth_gbs: Option<f64>,
    /// Peak arithmetic for the floor (TFLOP/s).
    #[arg(long)]
    pub peak_tflops: Option<f64>,
    /// Only cases with this input dtype (f32, f16, bf16).
    #[arg(long)]
    pub dtype: Option<String>,
    /// Write results as JSON to this file.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
    /// Recurrent tilings to compare, `KT,KR,BV` separated by `;` (e.g. `16,8,8;8,16,32`); each runs
    /// every case. Default: the device's own choice.
    #[arg(long)]
    pub tiles: Option<String>,
    /// Calls recorded into one submission (`Engine::batch`) and timed as one span; figures are per
    /// call. ggml's per-op figures come from a graph that repeats the op like this.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Override heads/dims: H, HV, K, V.
    #[arg(long, num_args = 4, value_names = ["H", "HV", "K", "V"])]
    pub heads: Option<Vec<usize>>,
    /// Only cases of this algorithm (recurrent, chunked).
    #[arg(long)]
    pub algorithm: Option<String>,
    /// Scratch budgets of the chunked passes' windows to compare, MiB separated by `,`
    /// (`Settings::chunk_window_bytes`); each runs every case. Default: the engine's own.
    #[arg(long, value_delimiter = ',')]
    pub window_mib: Vec<u64>,
    /// Run the preset's cases at these batch sizes instead of its own, separated by `,`.
    #[arg(long, value_delimiter = ',')]
    pub batch_sizes: Vec<usize>,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    /// Forward with h0 in and ht out.
    Forward,
    /// Decode against a state pool, in place.
    Decode,
    /// Forward that saves checkpoints, then the backward (h0 in, ht out, do and dht upstream).
    Train,
}

#[derive(Clone, Copy, Debug, PartialEq)]
struct Case {
    mode: Mode,
    b: usize,
    t: usize,
    dtype: DType,
    algo: Algorithm,
    /// Backward accumulation without atomics (Train only).
    deterministic: bool,
}

fn preset(name: &str) -> Vec<Case> {
    use Algorithm::*;
    let f = |mode, b, t, dtype, algo| Case { mode, b, t, dtype, algo, deterministic: false };
    let mut v = Vec::new();
    if name == "decode" || name == "all" {
        for b in [1, 8, 64, 256] {
            v.push(f(Mode::Decode, b, 1, DType::F32, Recurrent));
        }
        for b in [1, 256] {
            v.push(f(Mode::Forward, b, 1, DType::F32, Recurrent));
        }
    }
    if name == "prefill" || name == "all" {
        for (b, t) in [(1, 64), (1, 1024), (1, 4096), (1, 16384), (8, 4096)] {
            v.push(f(Mode::Forward, b, t, DType::F32, Recurrent));
        }
        for (b, t) in [(1, 1024), (1, 16384), (8, 8192)] {
            v.push(f(Mode::Forward, b, t, DType::BF16, Recurrent));
        }
    }
    if name == "chunked" || name == "all" {
        for c in [Recurrent, Chunked { chunk: 64 }] {
            for (b, t, dt) in
                [(1, 16384, DType::BF16), (8, 8192, DType::BF16), (1, 16384, DType::F32), (8, 4096, DType::F32)]
            {
                v.push(f(Mode::Forward, b, t, dt, c));
            }
        }
    }
    if name == "crossover" {
        // Where chunked overtakes recurrent (Algorithm::Auto's thresholds).
        for dt in [DType::BF16, DType::F32] {
            for b in [1, 4, 16] {
                for t in [256, 512, 1024, 4096] {
                    for c in [Recurrent, Chunked { chunk: 64 }] {
                        v.push(f(Mode::Forward, b, t, dt, c));
                    }
                }
            }
        }
    }
    if name == "train" || name == "all" {
        for (b, t) in [(1, 4096), (8, 8192)] {
            for det in [false, true] {
                v.push(Case { deterministic: det, ..f(Mode::Train, b, t, DType::BF16, Recurrent) });
            }
            v.push(f(Mode::Train, b, t, DType::BF16, Chunked { chunk: 64 }));
        }
    }
    if name == "train-step" {
        // One chunked training step at B=1, pass by pass (quick, for work on single passes).
        v.push(f(Mode::Train, 1, 4096, DType::BF16, Chunked { chunk: 64 }));
    }
    if name == "train-crossover" {
        // Where the chunked backward overtakes the recurrent one (Auto's backward rule).
        for b in [1, 4, 16] {
            for t in [256, 1024, 4096] {
                for c in [Recurrent, Chunked { chunk: 64 }] {
                    v.push(f(Mode::Train, b, t, DType::BF16, c));
                }
            }
        }
    }
    v
}

/// `KT,KR,BV;...` -> forced tilings (subgroup reduction where it fits); `None` = the device's choice.
fn parse_tiles(s: Option<&str>, caps: &wgdelta::Caps) -> wgdelta::Result<Vec<Option<Tiles>>> {
    let Some(s) = s else { return Ok(vec![None]) };
    s.split(';')
        .map(|t| {
            let n: Vec<u32> = t.split(',').filter_map(|x| x.trim().parse().ok()).collect();
            let [kt, kr, bv] = n[..] else {
                return Err(wgdelta::Error::Option { name: "tiles", why: format!("`{t}`: expected KT,KR,BV") });
            };
            let reduce = if caps.subgroup && kt <= caps.subgroup_min { Reduce::Subgroup } else { Reduce::Workgroup };
            Ok(Some(Tiles { kt, kr, bv, reduce }))
        })
        .collect()
}

/// The cases of a preset at other batch sizes (each case once per size, duplicates dropped); `bs`
/// empty keeps the preset's own.
fn with_batch_sizes(cases: Vec<Case>, bs: &[usize]) -> Vec<Case> {
    if bs.is_empty() {
        return cases;
    }
    let mut out: Vec<Case> = Vec::new();
    for c in cases {
        for &b in bs {
            let c = Case { b, ..c };
            if !out.contains(&c) {
                out.push(c);
            }
        }
    }
    out
}

fn median(mut x: Vec<f64>) -> f64 {
    if x.is_empty() {
        return f64::NAN;
    }
    x.sort_by(|a, b| a.total_cmp(b));
    x[x.len() / 2]
}

struct Row {
    case: Case,
    /// Median GPU time per call (timestamps), calls back to back.
    gpu_ms: Option<f64>,
    /// Wall time per call, calls back to back (throughput).
    wall_ms: f64,
    /// Median wall time of one call waited for (latency).
    latency_ms: f64,
    cost: Cost,
    passes: Vec<(String, f64)>,
}

pub fn run(a: &BenchArgs) -> wgdelta::Result<()> {
    let gpu = Gpu::new()?;
    let name = gpu.adapter_info().name.clone();
    let bw = a.bandwidth_gbs.or(if name.contains("H100") {
        Some(3000.0)
    } else if name.contains("H200") {
        Some(4300.0)
    } else {
        None
    });
    let peak = a.peak_tflops;
    let filter = a.dtype.as_deref().map(parse_dtype).transpose()?;
    let (h, hv, k, v) = match a.heads.as_deref() {
        Some([h, hv, k, v]) => (*h, *hv, *k, *v),
        _ => (16, 32, 128, 128),
    };
    eprintln!("wgdelta bench on {name} ({:?}); timestamps: {}", gpu.adapter_info().backend, gpu.caps().timestamp);
    let algo_filter = match a.algorithm.as_deref() {
        None => None,
        Some("recurrent") => Some(false),
        Some("chunked") => Some(true),
        Some(x) => {
            return Err(wgdelta::Error::Option {
                name: "algorithm",
                why: format!("`{x}`: expected recurrent or chunked"),
            })
        }
    };
    let windows: Vec<Option<u64>> =
        if a.window_mib.is_empty() { vec![None] } else { a.window_mib.iter().map(|&m| Some(m << 20)).collect() };
    let mut rows = Vec::new();
    for (tiles, window) in
        parse_tiles(a.tiles.as_deref(), gpu.caps())?.into_iter().flat_map(|t| windows.iter().map(move |&w| (t, w)))
    {
        if let Some(t) = tiles {
            println!("-- tiles {t:?}");
        }
        if let Some(w) = window {
            println!("-- window budget {} MiB", w >> 20);
        }
        let settings = Settings { recurrent_tiles: tiles, chunk_window_bytes: window, ..Default::default() };
        let timed = Engine::with_settings(
            gpu.clone(),
            Settings {
                profile: if a.batch > 1 { wgdelta::Profile::Submission } else { wgdelta::Profile::Passes },
                ..settings.clone()
            },
        );
        let plain = Engine::with_settings(gpu.clone(), settings);
        for case in with_batch_sizes(preset(&a.preset), &a.batch_sizes) {
            if filter.is_some_and(|f| f != case.dtype) {
                continue;
            }
            if algo_filter.is_some_and(|c| c != matches!(case.algo, Algorithm::Chunked { .. })) {
                continue;
            }
            let d = Dims { b: case.b, t: case.t, h, hv, k, v };
            match bench_case(&timed, &plain, d, case, a) {
                Ok(r) => {
                    print_row(&r, d, bw, peak);
                    rows.push(r);
                }
                Err(e) => eprintln!("  {case:?}: skipped: {e}"),
            }
        }
    }
    if let Some(path) = &a.json {
        let j: Vec<serde_json::Value> = rows
            .iter()
            .map(|r| {
                serde_json::json!({
                    "mode": format!("{:?}", r.case.mode), "b": r.case.b, "t": r.case.t, "h": h, "hv": hv, "k": k, "v": v,
                    "dtype": r.case.dtype.to_string(), "algorithm": format!("{:?}", r.case.algo),
                    "gpu_ms": r.gpu_ms, "wall_ms": r.wall_ms, "latency_ms": r.latency_ms, "bytes": r.cost.bytes, "flops": r.cost.flops,
                    "passes": r.passes.iter().map(|(l, ms)| serde_json::json!({"label": l, "ms": ms})).collect::<Vec<_>>(),
                    "adapter": name, "bandwidth_gbs": bw,
                })
            })
            .collect();
        let s = serde_json::to_string_pretty(&j).unwrap_or_default();
        std::fs::write(path, s).map_err(|e| wgdelta::Error::Io { path: path.display().to_string(), source: e })?;
    }
    Ok(())
}

fn bench_case(timed: &Engine, plain: &Engine, d: Dims, c: Case, a: &BenchArgs) -> wgdelta::Result<Row> {
    let decode = matches!(c.mode, Mode::Decode);
    let train = matches!(c.mode, Mode::Train);
    let host = model_like(d, c.dtype, GateSpace::Log, StateLayout::Kv, !decode, 11);
    let opts = Options {
        output_final_state: !decode,
        algorithm: c.algo,
        deterministic: c.deterministic,
        ..Options::default()
    };
    let mut passes: Vec<Vec<(String, f64)>> = Vec::new();
    let mut gpu_ms = Vec::new();
    let mut wall_ms = Vec::new();
    let mut latency_ms = Vec::new();
    let mut problem: Option<Problem> = None;
    for (eng, is_timed) in [(timed, true), (plain, false)] {
        let dev = host.upload(eng)?;
        let pool = if decode {
            Some(eng.upload(
                "pool",
                &wgdelta::HostTensor::from_f32(&[d.b, d.hv, d.k, d.v], &vec![0.01; d.b * d.hv * d.k * d.v]),
            )?)
        } else {
            None
        };
        // Reversed, so B > 1 times the general path (each row reads its slot); one sequence is
        // always a range of the pool, bound directly.
        let slots: Vec<i64> = (0..d.b as i64).rev().collect();
        let upstream = if train {
            let mut rng = wgdelta::Rng::new(5);
            let n = d.b * d.t * d.hv * d.v;
            let d_o =
                eng.upload("do", &wgdelta::HostTensor::from_f64(&[d.b, d.t, d.hv, d.v], &rng.normals(n), c.dtype))?;
            let s = [d.b, d.hv, d.k, d.v];
            let dht =
                eng.upload("dht", &wgdelta::HostTensor::from_f64(&s, &rng.normals(s.iter().product()), DType::F32))?;
            Some((d_o, dht))
        } else {
            None
        };
        let x = dev.inputs();
        if problem.is_none() {
            problem = Some(Problem::new(&x.meta(), None, &opts, false)?);
        }
        let one = || -> wgdelta::Result<()> {
            match (&pool, &upstream) {
                (Some(p), _) => eng.decode(&x, p, &slots, &opts).map(drop),
                (None, Some((d_o, dht))) => {
                    let (_, saved) = eng.forward_train(&x, &opts)?;
                    eng.backward(&saved, d_o, Some(dht)).map(drop)
                }
                (None, None) => eng.forward(&x, &opts).map(drop),
            }
        };
        let reps = a.batch.max(1);
        let call = || -> wgdelta::Result<()> {
            if reps == 1 {
                return one();
            }
            eng.batch(|| (0..reps).try_for_each(|_| one()))
        };
        // Warm up: the first call compiles the pipelines (seconds on a cold start, while the GPU idles);
        // then run the GPU long enough (>= 0.3 s of calls) that its clocks settle. The first case of
        // a run used to count the compilation into the 0.3 s, and its GPU timestamps came out up to
        // 5x its wall time on the H100 (docs/PERF.md R62); with this warm-up they match (R63-R71).
        call()?;
        eng.sync()?;
        let t0 = Instant::now();
        let mut n = 1;
        while n < a.warmup || (t0.elapsed().as_secs_f64() < 0.3 && n < 10_000) {
            call()?;
            n += 1;
            if n % 32 == 0 {
                eng.sync()?;
            }
        }
        eng.sync()?;
        if is_timed {
            // Back-to-back profiled calls; timestamps read once at the end.
            eng.take_profiles()?;
            for _ in 0..a.runs {
                call()?;
            }
            eng.sync()?;
            // One entry per submission; a training call submits twice (forward, backward).
            let per_call = if train { 2 } else { 1 };
            let per = if reps > 1 { 1 } else { per_call };
            for call in eng.take_profiles()?.chunks(per) {
                let p: Vec<_> = call.iter().flatten().collect();
                gpu_ms.push(p.iter().map(|x| x.ns).sum::<f64>() * 1e-6 / reps as f64);
                passes.push(p.iter().map(|x| (x.label.to_string(), x.ns * 1e-6 / reps as f64)).collect());
            }
        } else {
            // Throughput: back-to-back calls, one wait at the end.
            let t0 = Instant::now();
            for _ in 0..a.runs {
                call()?;
            }
            eng.sync()?;
            wall_ms.push(t0.elapsed().as_secs_f64() * 1e3 / (a.runs * reps) as f64);
            // Latency: each call waited for.
            for _ in 0..a.runs.min(50) {
                let t0 = Instant::now();
                call()?;
                eng.sync()?;
                latency_ms.push(t0.elapsed().as_secs_f64() * 1e3 / reps as f64);
            }
        }
    }
    let p = problem.expect("set in the first loop");
    let cost = match c.algo {
        Algorithm::Chunked { chunk } => cost::chunked_forward(&p, chunk as usize, !decode, !decode),
        _ => cost::recurrent_forward(&p, true, true),
    };
    // Median per pass label, in first-seen order.
    let mut per_pass = Vec::new();
    if let Some(first) = passes.first() {
        for (i, (label, _)) in first.iter().enumerate() {
            per_pass.push((label.clone(), median(passes.iter().filter_map(|r| r.get(i).map(|x| x.1)).collect())));
        }
    }
    Ok(Row {
        case: c,
        gpu_ms: (!gpu_ms.is_empty()).then(|| median(gpu_ms)),
        wall_ms: median(wall_ms),
        latency_ms: median(latency_ms),
        cost,
        passes: per_pass,
    })
}

fn print_row(r: &Row, d: Dims, bw: Option<f64>, peak: Option<f64>) {
    let c = r.case;
    let t_ms = r.gpu_ms.unwrap_or(r.wall_ms);
    let toks = (d.b * d.t) as f64;
    let gbs = r.cost.bytes / (t_ms * 1e-3) / 1e9;
    let tflops = r.cost.flops / (t_ms * 1e-3) / 1e12;
    let floor = bw.map(|bw| r.cost.bytes / (bw * 1e9) * 1e3);
    let flop_floor = peak.map(|p| r.cost.flops / (p * 1e12) * 1e3);
    println!(
        "{:<8} B={:<4} T={:<6} {:<5} {:<22} gpu {:>9} ms  wall {:>9.4} ms  lat {:>8.4} ms  {:>8.3} Mtok/s  {:>7.1} GB/s  {:>6.2} TFLOP/s  {}{}  [{}]",
        format!("{:?}", c.mode),
        c.b,
        c.t,
        c.dtype.to_string(),
        format!("{:?}{}", c.algo, if c.deterministic { " det" } else { "" }),
        // Five significant digits for short calls too (decode: microseconds).
        r.gpu_ms.map(|g| if g < 0.1 { format!("{g:.6}") } else { format!("{g:.4}") }).unwrap_or_else(|| "-".into()),
        r.wall_ms,
        r.latency_ms,
        toks / (t_ms * 1e-3) / 1e6,
        gbs,
        tflops,
        floor.map(|f| format!("mem floor {f:.4} ms ({:.0}%)", 100.0 * f / t_ms)).unwrap_or_default(),
        flop_floor.map(|f| format!(" flop floor {f:.4} ms")).unwrap_or_default(),
        r.passes.iter().map(|(l, ms)| format!("{l} {ms:.4}")).collect::<Vec<_>>().join(", ")
    );
}
