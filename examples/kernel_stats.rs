//! What the Vulkan driver made of each kernel a call ran: register count, spills, workgroup memory and
//! whatever else it reports through `VK_KHR_pipeline_executable_properties` (NVIDIA reports
//! registers; wgpu cannot ask for these, so this rebuilds each pipeline itself with `ash`).
//!
//! It runs one forward through the engine (default adapter), takes the engine's compiled keys,
//! translates each through naga exactly as wgpu's Vulkan backend does (WGSL, override constants,
//! SPIR-V 1.3, no runtime checks) and compiles it again with statistics captured. Occupancy follows:
//! on an H100, 65536 registers and 228 KiB of workgroup memory per SM.
//!
//! Run: `cargo run --release --example kernel_stats -- [B T [dtype [chunk]]]` (default `8 8192 bf16 64`:
//! the chunked forward of the bf16 B=8 T=8192 H=16 HV=32 K=V=128 benchmark; `0` for the chunk runs
//! the recurrent forward).
use ash::vk;
use std::ffi::CStr;
use wgdelta::kernels::{assemble_mma, Slot, MMA_TILES};
use wgdelta::synth::model_like;
use wgdelta::{Algorithm, DType, Dims, Engine, GateSpace, Options, StateLayout};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, d: &str| a.get(i).cloned().unwrap_or_else(|| d.to_string());
    let (b, t): (usize, usize) = (arg(0, "8").parse()?, arg(1, "8192").parse()?);
    let dtype = match arg(2, "bf16").as_str() {
        "f32" => DType::F32,
        "f16" => DType::F16,
        _ => DType::BF16,
    };
    let chunk: u32 = arg(3, "64").parse()?;

    // 1. The call, so the engine compiles exactly the keys it dispatches.
    let eng = Engine::new()?;
    let d = Dims { b, t, h: 16, hv: 32, k: 128, v: 128 };
    let host = model_like(d, dtype, GateSpace::Log, StateLayout::Kv, true, 7);
    let dev = host.upload(&eng)?;
    let algorithm = if chunk == 0 { Algorithm::Recurrent } else { Algorithm::Chunked { chunk } };
    let opts = Options { output_final_state: true, algorithm, ..Options::default() };
    let _ = eng.forward(&dev.inputs(), &opts)?;
    eng.sync()?;
    let mut keys = eng.compiled_kernels();
    keys.sort_by_key(|k| (k.kernel.label(), k.constants.clone()));
    println!("{} on {:?}: {} pipelines", eng.gpu().adapter_info().name, (b, t, dtype, chunk), keys.len());

    // 2. A Vulkan device of our own with pipelineExecutableInfo and every feature the GPU has.
    // SAFETY: plain Vulkan calls on handles made here; every struct outlives the call it is passed to.
    unsafe {
        let entry = ash::Entry::load()?;
        let app = vk::ApplicationInfo::default().api_version(vk::API_VERSION_1_3);
        let instance = entry.create_instance(&vk::InstanceCreateInfo::default().application_info(&app), None)?;
        let pds = instance.enumerate_physical_devices()?;
        let pd = *pds
            .iter()
            .find(|&&p| instance.get_physical_device_properties(p).device_type == vk::PhysicalDeviceType::DISCRETE_GPU)
            .or(pds.first())
            .ok_or("no Vulkan device")?;
        let exts: Vec<String> = instance
            .enumerate_device_extension_properties(pd)?
            .iter()
            .map(|e| CStr::from_ptr(e.extension_name.as_ptr()).to_string_lossy().into_owned())
            .collect();
        let want = [vk::KHR_PIPELINE_EXECUTABLE_PROPERTIES_NAME, vk::KHR_COOPERATIVE_MATRIX_NAME];
        let ext_ptrs: Vec<*const std::ffi::c_char> =
            want.iter().filter(|n| exts.iter().any(|e| e.as_bytes() == n.to_bytes())).map(|n| n.as_ptr()).collect();
        if ext_ptrs.is_empty() || !exts.iter().any(|e| e.as_bytes() == want[0].to_bytes()) {
            return Err("the driver lacks VK_KHR_pipeline_executable_properties".into());
        }
        let mut f11 = vk::PhysicalDeviceVulkan11Features::default();
        let mut f12 = vk::PhysicalDeviceVulkan12Features::default();
        let mut f13 = vk::PhysicalDeviceVulkan13Features::default();
        let mut fx = vk::PhysicalDevicePipelineExecutablePropertiesFeaturesKHR::default();
        let mut fc = vk::PhysicalDeviceCooperativeMatrixFeaturesKHR::default();
        let coop = ext_ptrs.len() == 2;
        let mut f2 = vk::PhysicalDeviceFeatures2::default()
            .push_next(&mut f11)
            .push_next(&mut f12)
            .push_next(&mut f13)
            .push_next(&mut fx);
        if coop {
            f2 = f2.push_next(&mut fc);
        }
        instance.get_physical_device_features2(pd, &mut f2);
        let prio = [1.0f32];
        let qi = [vk::DeviceQueueCreateInfo::default().queue_family_index(0).queue_priorities(&prio)];
        let dci = vk::DeviceCreateInfo::default()
            .queue_create_infos(&qi)
            .enabled_extension_names(&ext_ptrs)
            .push_next(&mut f2);
        let device = instance.create_device(pd, &dci, None)?;
        let px = ash::khr::pipeline_executable_properties::Device::new(&instance, &device);

        println!(
            "{:<22} {:>8} {:>6} {:>6} {:>5}  constants / statistics",
            "kernel", "threads", "regs", "smem", "spill"
        );
        for key in &keys {
            // 3. naga, as wgpu's Vulkan backend runs it.
            let src = assemble_mma(key.kernel, key.reduce, key.accum, key.mma.unwrap_or(MMA_TILES[0]));
            let module = naga::front::wgsl::parse_str(&src)?;
            let mut v =
                naga::valid::Validator::new(naga::valid::ValidationFlags::all(), naga::valid::Capabilities::all());
            v.subgroup_stages(naga::valid::ShaderStages::COMPUTE);
            v.subgroup_operations(naga::valid::SubgroupOperationSet::all());
            let info = v.validate(&module)?;
            let mut constants = naga::back::PipelineConstants::default();
            for (n, x) in key.constants_f64() {
                constants.insert(n.to_string(), x);
            }
            let ep = Some((naga::ShaderStage::Compute, "main"));
            let (m, i) = naga::back::pipeline_constants::process_overrides(&module, &info, ep, &constants)?;
            let threads: u32 = m.entry_points[0].workgroup_size.iter().product();
            let opts = naga::back::spv::Options {
                lang_version: (1, 3),
                bounds_check_policies: naga::proc::BoundsCheckPolicies::default(),
                ..Default::default()
            };
            let pipe = naga::back::spv::PipelineOptions {
                shader_stage: naga::ShaderStage::Compute,
                entry_point: "main".into(),
            };
            let words = naga::back::spv::write_vec(&m, &i, &opts, Some(&pipe))?;

            // 4. The pipeline, with the bindings of the kernel's slot table.
            let bindings: Vec<vk::DescriptorSetLayoutBinding> = key
                .kernel
                .slots()
                .iter()
                .enumerate()
                .map(|(n, s)| {
                    vk::DescriptorSetLayoutBinding::default()
                        .binding(n as u32)
                        .descriptor_type(if *s == Slot::Uniform {
                            vk::DescriptorType::UNIFORM_BUFFER
                        } else {
                            vk::DescriptorType::STORAGE_BUFFER
                        })
                        .descriptor_count(1)
                        .stage_flags(vk::ShaderStageFlags::COMPUTE)
                })
                .collect();
            let dsl = device.create_descriptor_set_layout(
                &vk::DescriptorSetLayoutCreateInfo::default().bindings(&bindings),
                None,
            )?;
            let layouts = [dsl];
            let pl =
                device.create_pipeline_layout(&vk::PipelineLayoutCreateInfo::default().set_layouts(&layouts), None)?;
            let sm = device.create_shader_module(&vk::ShaderModuleCreateInfo::default().code(&words), None)?;
            let stage = vk::PipelineShaderStageCreateInfo::default()
                .stage(vk::ShaderStageFlags::COMPUTE)
                .module(sm)
                .name(c"main");
            let ci = [vk::ComputePipelineCreateInfo::default()
                .stage(stage)
                .layout(pl)
                .flags(vk::PipelineCreateFlags::CAPTURE_STATISTICS_KHR)];
            let p = device.create_compute_pipelines(vk::PipelineCache::null(), &ci, None).map_err(|e| e.1)?[0];

            // 5. Its statistics.
            let pinfo = vk::PipelineInfoKHR::default().pipeline(p);
            let execs = px.get_pipeline_executable_properties(&pinfo)?;
            let mut stats = Vec::new();
            for n in 0..execs.len() as u32 {
                let ei = vk::PipelineExecutableInfoKHR::default().pipeline(p).executable_index(n);
                for s in px.get_pipeline_executable_statistics(&ei)? {
                    let name = CStr::from_ptr(s.name.as_ptr()).to_string_lossy().into_owned();
                    let val = match s.format {
                        vk::PipelineExecutableStatisticFormatKHR::BOOL32 => s.value.b32 as f64,
                        vk::PipelineExecutableStatisticFormatKHR::INT64 => s.value.i64 as f64,
                        vk::PipelineExecutableStatisticFormatKHR::UINT64 => s.value.u64 as f64,
                        _ => s.value.f64,
                    };
                    stats.push((name, val));
                }
            }
            let find = |w: &str| {
                stats
                    .iter()
                    .find(|(n, _)| n.to_lowercase().contains(w))
                    .map(|(_, v)| format!("{v}"))
                    .unwrap_or_else(|| "-".into())
            };
            let cs: Vec<String> = key.constants_f64().iter().map(|(n, x)| format!("{n}={x}")).collect();
            println!(
                "{:<22} {:>8} {:>6} {:>6} {:>5}  {}",
                key.kernel.label(),
                threads,
                find("register"),
                find("shared"),
                find("spill"),
                cs.join(" ")
            );
            let all: Vec<String> = stats.iter().map(|(n, v)| format!("{n}={v}")).collect();
            println!("{:<22} {}", "", all.join("; "));
            device.destroy_pipeline(p, None);
            device.destroy_shader_module(sm, None);
            device.destroy_pipeline_layout(pl, None);
            device.destroy_descriptor_set_layout(dsl, None);
        }
        device.destroy_device(None);
        instance.destroy_instance(None);
    }
    Ok(())
}
