//! The cooperative-matrix operations the `*_mma` kernels rely on, one by one, on the test adapter:
//! tile loads row- and column-major from storage and from workgroup memory, a zero accumulator
//! loaded from workgroup memory, multiply-add, row-major stores. Skipped (with a note) where the
//! adapter has no 16x16 f16 -> f32 tiles, e.g. the software driver.

use wgdelta::kernels::mma_header;
use wgdelta::{Gpu, GpuOptions};

/// X is a 32 x 32 f16 matrix, row-major. Each probe computes one 16 x 16 tile product
/// A B (+ C) from blocks of X and stores it row-major at out[16 * 16 * probe].
const PROBES: &str = r#"
@group(0) @binding(0) var<storage, read> x16: array<f16>;
@group(0) @binding(1) var<storage, read> c32: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;
var<workgroup> zt: array<f32, 256>;
var<workgroup> xs: array<f16, 1024>;

@compute @workgroup_size(WGX)
fn main(@builtin(local_invocation_index) lid: u32) {
    for (var e = lid; e < 256u; e += WGX) {
        zt[e] = 0.0;
    }
    for (var e = lid; e < 1024u; e += WGX) {
        xs[e] = x16[e];
    }
    workgroupBarrier();
    let zp = &zt[0];
    let a_g = &x16[0];          // A = X[0:16, 0:16]
    let b_g = &x16[16];         // B = X[0:16, 16:32]
    let bt_g = &x16[512];       // column-major at X[16, 0]: B(r, c) = X[16 + c, r]
    let a_w = &xs[0];
    let b_w = &xs[16];
    let bt_w = &xs[512];
    let c_g = &c32[0];
    // 0: storage A, storage B, zero accumulator from workgroup memory.
    var r0 = coopLoadT<MC>(zp, 16u);
    r0 = coopMultiplyAdd(coopLoadT<MA>(a_g, 32u), coopLoadT<MB>(b_g, 32u), r0);
    let o0 = &out[0];
    coopStoreT(r0, o0, 16u);
    // 1: the same from workgroup memory.
    var r1 = coopLoadT<MC>(zp, 16u);
    r1 = coopMultiplyAdd(coopLoadT<MA>(a_w, 32u), coopLoadT<MB>(b_w, 32u), r1);
    let o1 = &out[256];
    coopStoreT(r1, o1, 16u);
    // 2: column-major B from storage.
    var r2 = coopLoadT<MC>(zp, 16u);
    r2 = coopMultiplyAdd(coopLoadT<MA>(a_g, 32u), coopLoad<MB>(bt_g, 32u), r2);
    let o2 = &out[512];
    coopStoreT(r2, o2, 16u);
    // 3: column-major B from workgroup memory.
    var r3 = coopLoadT<MC>(zp, 16u);
    r3 = coopMultiplyAdd(coopLoadT<MA>(a_w, 32u), coopLoad<MB>(bt_w, 32u), r3);
    let o3 = &out[768];
    coopStoreT(r3, o3, 16u);
    // 4: accumulator from storage (C, row-major, stride 16).
    var r4 = coopLoadT<MC>(c_g, 16u);
    r4 = coopMultiplyAdd(coopLoadT<MA>(a_g, 32u), coopLoadT<MB>(b_g, 32u), r4);
    let o4 = &out[1024];
    coopStoreT(r4, o4, 16u);
    // 5: two products into one accumulator, over a K of 32 (A = X[0:16, :], B = X[:, 0:16]).
    var r5 = coopLoadT<MC>(zp, 16u);
    for (var k0 = 0u; k0 < 32u; k0 += 16u) {
        let ap = &x16[k0];
        let bp = &x16[k0 * 32u];
        r5 = coopMultiplyAdd(coopLoadT<MA>(ap, 32u), coopLoadT<MB>(bp, 32u), r5);
    }
    let o5 = &out[1280];
    coopStoreT(r5, o5, 16u);
}
"#;

const N_PROBES: usize = 6;

fn expected(x: &[f32], c: &[f32]) -> Vec<f32> {
    let xm = |r: usize, col: usize| x[r * 32 + col] as f64;
    let mut out = vec![0f32; N_PROBES * 256];
    for i in 0..16 {
        for j in 0..16 {
            let ab: f64 = (0..16).map(|m| xm(i, m) * xm(m, 16 + j)).sum();
            let abt: f64 = (0..16).map(|m| xm(i, m) * xm(16 + j, m)).sum();
            let k32: f64 = (0..32).map(|m| xm(i, m) * xm(m, j)).sum();
            let e = i * 16 + j;
            for (p, v) in [ab, ab, abt, abt, ab + c[e] as f64, k32].into_iter().enumerate() {
                out[p * 256 + e] = v as f32;
            }
        }
    }
    out
}

#[test]
fn cooperative_matrix_primitives() {
    let gpu = Gpu::with_options(&GpuOptions { shader_checks: Some(true), ..Default::default() }).expect("adapter");
    if gpu.caps().mma_tile() != Some(16) {
        println!("skipped: {} has no 16x16 f16 -> f32 cooperative matrices", gpu.adapter_info().name);
        return;
    }
    let (device, queue) = gpu.raw();
    // Small integers and halves: exact in f16, sums exact in f32.
    let x: Vec<f32> = (0..1024).map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.5).collect();
    let c: Vec<f32> = (0..256).map(|i| (i % 7) as f32).collect();
    let x16: Vec<u16> = x.iter().map(|&v| half::f16::from_f32(v).to_bits()).collect();
    use wgpu::util::DeviceExt;
    let buf = |contents: &[u8], usage| {
        device.create_buffer_init(&wgpu::util::BufferInitDescriptor { label: Some("probe"), contents, usage })
    };
    let bx = buf(bytemuck::cast_slice(&x16), wgpu::BufferUsages::STORAGE);
    let bc = buf(bytemuck::cast_slice(&c), wgpu::BufferUsages::STORAGE);
    let poison = vec![f32::NAN; N_PROBES * 256];
    let bo = buf(bytemuck::cast_slice(&poison), wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC);
    let read = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("probe.read"),
        size: bo.size(),
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let mut results = Vec::new();
    for wg in [32u32, 64] {
        let src = format!("{}const WGX: u32 = {wg}u;\n{PROBES}", mma_header(16));
        let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some("probe"),
            source: wgpu::ShaderSource::Wgsl(src.into()),
        });
        let pipe = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some("probe"),
            layout: None,
            module: &module,
            entry_point: Some("main"),
            compilation_options: Default::default(),
            cache: None,
        });
        let bg = device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some("probe"),
            layout: &pipe.get_bind_group_layout(0),
            entries: &[
                wgpu::BindGroupEntry { binding: 0, resource: bx.as_entire_binding() },
                wgpu::BindGroupEntry { binding: 1, resource: bc.as_entire_binding() },
                wgpu::BindGroupEntry { binding: 2, resource: bo.as_entire_binding() },
            ],
        });
        let mut enc = device.create_command_encoder(&Default::default());
        {
            let mut pass = enc.begin_compute_pass(&Default::default());
            pass.set_pipeline(&pipe);
            pass.set_bind_group(0, &bg, &[]);
            pass.dispatch_workgroups(1, 1, 1);
        }
        enc.copy_buffer_to_buffer(&bo, 0, &read, 0, bo.size());
        queue.submit([enc.finish()]);
        read.slice(..).map_async(wgpu::MapMode::Read, |r| r.expect("map"));
        device.poll(wgpu::PollType::wait_indefinitely()).expect("poll");
        let got: Vec<f32> = bytemuck::cast_slice(&read.slice(..).get_mapped_range().expect("mapped")).to_vec();
        read.unmap();
        results.push((wg, got));
    }
    let want = expected(&x, &c);
    let names = [
        "storage A, B",
        "workgroup A, B",
        "column-major B, storage",
        "column-major B, workgroup",
        "C from storage",
        "K = 32",
    ];
    let mut bad = Vec::new();
    for (wg, got) in &results {
        for (p, name) in names.iter().enumerate() {
            let wrong: Vec<usize> = (0..256).filter(|&e| got[p * 256 + e] != want[p * 256 + e]).collect();
            println!("{wg} threads, probe {p} ({name}): {} of 256 wrong", wrong.len());
            if let Some(&e) = wrong.first() {
                bad.push(format!(
                    "{wg} threads, {name}: ({}, {}) = {} vs {}",
                    e / 16,
                    e % 16,
                    got[p * 256 + e],
                    want[p * 256 + e]
                ));
            }
        }
    }
    assert!(bad.is_empty(), "cooperative-matrix probes wrong:\n{}", bad.join("\n"));
}
