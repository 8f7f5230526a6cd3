//! Criterion sweep of the forward over T, B, input dtype and algorithm on the default adapter
//! (wall time per call including the wait; `wgdelta bench` reports GPU time from timestamps).
//! Shapes are small enough for the software driver; set WGDELTA_BENCH_FULL=1 for Qwen3.5's heads.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use wgdelta::synth::model_like;
use wgdelta::{Algorithm, DType, Dims, Engine, GateSpace, Options, StateLayout};

fn forward(c: &mut Criterion) {
    let eng = match Engine::new() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("no adapter, skipping: {e}");
            return;
        }
    };
    let full = std::env::var("WGDELTA_BENCH_FULL").is_ok_and(|v| v == "1");
    let (h, hv, k, v) = if full { (16, 32, 128, 128) } else { (2, 4, 64, 64) };
    let mut g = c.benchmark_group("forward");
    g.sample_size(10);
    for (b, t) in [(1, 64), (1, 1024), (4, 256)] {
        for dtype in [DType::F32, DType::BF16] {
            for algo in [Algorithm::Recurrent, Algorithm::Chunked { chunk: 64 }] {
                let d = Dims { b, t, h, hv, k, v };
                let host = model_like(d, dtype, GateSpace::Log, StateLayout::Kv, true, 3);
                let Ok(dev) = host.upload(&eng) else { continue };
                let opts = Options { output_final_state: true, algorithm: algo, ..Options::default() };
                g.throughput(Throughput::Elements((b * t) as u64));
                let id = BenchmarkId::new(format!("{algo:?}/{dtype}"), format!("B{b}xT{t}"));
                g.bench_with_input(id, &opts, |bench, opts| {
                    bench.iter(|| {
                        eng.forward(&dev.inputs(), opts).expect("forward");
                        eng.sync().expect("sync");
                    })
                });
            }
        }
    }
    g.finish();
}

criterion_group!(benches, forward);
criterion_main!(benches);
