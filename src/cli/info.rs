//! `wgdelta info`: adapters, the chosen one, its granted features and limits.

use wgdelta::device::list_adapters;
use wgdelta::Engine;

pub fn run() -> wgdelta::Result<()> {
    println!("adapters (best first; select with WGDELTA_ADAPTER=<index|name|cpu>):");
    for a in list_adapters() {
        println!("  [{}] {} — {} {} ({})", a.index, a.name, a.backend, a.device_type, a.driver.trim());
    }
    let eng = Engine::new()?;
    let gpu = eng.gpu();
    let i = gpu.adapter_info();
    let c = gpu.caps();
    println!("chosen: {} ({:?}, {:?})", i.name, i.backend, i.device_type);
    println!("driver: {} {}", i.driver, i.driver_info);
    let yn = |b: bool| if b { "yes" } else { "no" };
    println!("features:");
    println!("  SHADER_F16                       {}", yn(c.f16));
    println!("  SHADER_F64                       {}", yn(c.f64));
    println!("  SUBGROUP                         {} (sizes {}..{})", yn(c.subgroup), c.subgroup_min, c.subgroup_max);
    println!("  SHADER_FLOAT32_ATOMIC            {}", yn(c.f32_atomic));
    println!("  TIMESTAMP_QUERY                  {}", yn(c.timestamp));
    println!("  PASSTHROUGH_SHADERS              {}", yn(c.passthrough));
    let coop: Vec<String> =
        c.coop_matrix.iter().map(|s| format!("{}x{}x{} {}->{}", s.m, s.n, s.k, s.ab, s.cr)).collect();
    println!("  EXPERIMENTAL_COOPERATIVE_MATRIX  {}", if coop.is_empty() { "no".to_string() } else { coop.join(", ") });
    println!("limits:");
    println!("  max_storage_buffer_binding_size  {} MiB", c.max_binding >> 20);
    println!("  max_buffer_size                  {} MiB", c.max_buffer >> 20);
    println!("  max_compute_workgroup_storage    {} KiB", c.max_workgroup_storage >> 10);
    println!("  max_invocations_per_workgroup    {}", c.max_invocations);
    println!("  max_storage_buffers_per_stage    {}", c.max_storage_buffers);
    println!("  max_workgroups_per_dimension     {}", c.max_workgroups_per_dim);
    println!("shader bounds checks: {}", if gpu.shader_checks() { "on" } else { "off" });
    Ok(())
}
