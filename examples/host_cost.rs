//! Host cost of recording a decode call: 100 calls recorded into one `Engine::batch`, timed
//! without the submission (the GPU work is a tiny head, so even the software driver keeps up).
//! The best of 60 rounds, in microseconds per call. Run: `cargo run --release --example host_cost`.
use std::time::Instant;
use wgdelta::synth::model_like;
use wgdelta::*;

fn main() -> Result<()> {
    let gpu = Gpu::new()?;
    let eng = Engine::with_settings(gpu, Settings::default());
    let d = Dims { b: 1, t: 1, h: 1, hv: 1, k: 16, v: 16 };
    let host = model_like(d, DType::F32, GateSpace::Log, StateLayout::Kv, false, 11);
    let dev = host.upload(&eng)?;
    let pool = eng.upload("pool", &HostTensor::from_f32(&[1, 1, 16, 16], &vec![0.01; 256]))?;
    let opts = Options { output_final_state: false, ..Options::default() };
    let x = dev.inputs();
    let mut best = f64::MAX;
    for _ in 0..60 {
        let mut rec = 0.0;
        eng.batch(|| {
            let t = Instant::now();
            for _ in 0..100 {
                eng.decode(&x, &pool, &[0], &opts)?;
            }
            rec = t.elapsed().as_secs_f64();
            Ok(())
        })?;
        let o = eng.decode(&x, &pool, &[0], &opts)?;
        let _ = eng.download(&o)?;
        best = best.min(rec * 1e4);
    }
    println!("record: best {best:.2} us per decode call");
    Ok(())
}
