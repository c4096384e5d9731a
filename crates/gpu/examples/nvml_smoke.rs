//! Read-only smoke test of the device layer.
//!
//! ```text
//! cargo run -p nvdra-gpu --example nvml_smoke -- [--driver-root /]
//! cargo run -p nvdra-gpu --example nvml_smoke -- --fake crates/gpu/profiles/gb200-x4.yaml
//! cargo run -p nvdra-gpu --example nvml_smoke -- --fake a100-40gb-x8-mig
//! ```
//!
//! Opens the NVML backend (or a fake profile: a file, or the name of a
//! built-in profile) and prints every GPU with its MIG devices, MIG profile
//! table, fabric facts, device nodes, and the device names, attributes and
//! capacities the agent would publish; then the IMEX facts and the
//! [`nvdra_gpu::conformance`] findings: contract violations, and differences
//! from the fake model of each GPU's product. `--json FILE` also writes the
//! inventory as JSON (the record `docs/hardware-runs.md` keeps). It never
//! changes any GPU setting. Exits non-zero when a contract check fails.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use nvdra_gpu::attributes::{self, AttributeValue, Attributes, Capacities};
use nvdra_gpu::{
    FakeBackend, GpuBackend, GpuInventory, Inventory, NvmlBackend, NvmlOptions, conformance,
    gpu_device_name,
};

const USAGE: &str = "usage: nvml_smoke [--driver-root <dir> | --fake <profile file or built-in name>] [--json <file>]";

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    run(&args, &mut out)
}

enum Source {
    Nvml { driver_root: PathBuf },
    Fake(String),
}

fn parse_args(args: &[String]) -> anyhow::Result<(Source, Option<PathBuf>)> {
    let mut json = None;
    let mut source = Source::Nvml {
        driver_root: PathBuf::from("/"),
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = || {
            it.next()
                .with_context(|| format!("{arg} needs a value\n{USAGE}"))
        };
        match arg.as_str() {
            "--driver-root" => {
                source = Source::Nvml {
                    driver_root: PathBuf::from(value()?),
                }
            }
            "--fake" => source = Source::Fake(value()?.clone()),
            "--json" => json = Some(PathBuf::from(value()?)),
            "-h" | "--help" => bail!("{USAGE}"),
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    Ok((source, json))
}

fn open(source: Source) -> anyhow::Result<Box<dyn GpuBackend>> {
    Ok(match source {
        Source::Nvml { driver_root } => Box::new(
            NvmlBackend::new(NvmlOptions::new(&driver_root))
                .with_context(|| format!("opening NVML under {}", driver_root.display()))?,
        ),
        Source::Fake(profile) => {
            let backend = if Path::new(&profile).exists() {
                FakeBackend::from_file(&profile)?
            } else {
                FakeBackend::builtin(&profile).with_context(|| {
                    format!("{profile:?} is neither a file nor a built-in profile")
                })??
            };
            Box::new(backend)
        }
    })
}

fn run(args: &[String], out: &mut impl Write) -> anyhow::Result<()> {
    let (source, json) = parse_args(args)?;
    let started = Instant::now();
    let backend = open(source)?;
    let opened = started.elapsed();
    let inventory = backend.inventory().context("reading the GPU inventory")?;
    let read = started.elapsed() - opened;
    writeln!(
        out,
        "timing open {} ms, inventory {} ms",
        opened.as_millis(),
        read.as_millis()
    )?;
    report(backend.as_ref(), &inventory, out)?;
    let imex = backend.imex().context("reading IMEX facts")?;
    writeln!(out)?;
    writeln!(
        out,
        "imex channels {} channels major {} caps major {} fabric-mgmt minor {}",
        imex.channel_count,
        show(imex.channels_major),
        show(imex.caps_major),
        show(imex.fabric_mgmt_minor),
    )?;
    if let Some(path) = json {
        let record = serde_json::json!({ "inventory": inventory, "imex": imex });
        std::fs::write(&path, serde_json::to_vec_pretty(&record)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    conformance_report(&inventory, out)
}

fn show(value: Option<u32>) -> String {
    value.map_or("none".into(), |v| v.to_string())
}

/// Prints the contract findings and model differences; fails on the former.
fn conformance_report(inv: &Inventory, out: &mut impl Write) -> anyhow::Result<()> {
    for gpu in &inv.gpus {
        let who = format!("index {} {}", gpu.info.index, gpu.info.product_name);
        match conformance::compare_with_model(gpu) {
            None => writeln!(out, "model {who}: no fake model for this product")?,
            Some((model, diffs)) if diffs.is_empty() => {
                writeln!(out, "model {who}: matches {model:?}")?;
            }
            Some((model, diffs)) => {
                writeln!(out, "model {who}: differs from {model:?}")?;
                for d in diffs {
                    writeln!(out, "  {d}")?;
                }
            }
        }
    }
    let findings = conformance::check_inventory(inv);
    if findings.is_empty() {
        writeln!(out, "contract ok")?;
        return Ok(());
    }
    for f in &findings {
        writeln!(out, "contract violated: {f}")?;
    }
    bail!("{} contract violation(s)", findings.len())
}

fn report(backend: &dyn GpuBackend, inv: &Inventory, out: &mut impl Write) -> anyhow::Result<()> {
    let d = &inv.driver;
    writeln!(
        out,
        "driver {} (CUDA {})",
        d.driver_version, d.cuda_driver_version
    )?;
    writeln!(out, "dev root {}", backend.dev_root().display())?;
    let control: Vec<String> = backend
        .control_device_nodes()
        .iter()
        .map(|n| n.host_path.display().to_string())
        .collect();
    writeln!(out, "control nodes {}", control.join(" "))?;
    writeln!(out, "{} GPU(s)", inv.gpus.len())?;
    for gpu in &inv.gpus {
        report_gpu(backend, inv, gpu, out)?;
    }
    Ok(())
}

fn report_gpu(
    backend: &dyn GpuBackend,
    inv: &Inventory,
    gpu: &GpuInventory,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let g = &gpu.info;
    writeln!(out)?;
    writeln!(
        out,
        "{} index {} {} {}",
        gpu_device_name(g.minor),
        g.index,
        g.uuid,
        g.product_name
    )?;
    writeln!(
        out,
        "  {} brand {} cc {} memory {} pci {} root {} addressing {}",
        g.architecture,
        g.brand,
        g.cuda_compute_capability,
        g.memory_bytes
            .map_or("unknown".into(), |m| format!("{} MiB", m >> 20)),
        g.pci_bus_id,
        g.pcie_root.as_deref().unwrap_or("unknown"),
        g.addressing_mode
            .map_or("unsupported".into(), |m| m.to_string()),
    )?;
    let mig = match (g.mig_capable, g.mig_enabled) {
        (false, _) => "not capable",
        (true, false) => "disabled",
        (true, true) => "enabled",
    };
    writeln!(out, "  MIG {mig}")?;
    let nodes: Vec<String> = backend
        .gpu_device_nodes(g)
        .iter()
        .map(|n| n.host_path.display().to_string())
        .collect();
    writeln!(out, "  nodes {}", nodes.join(" "))?;
    match &gpu.fabric {
        None => writeln!(out, "  fabric unsupported")?,
        Some(f) => writeln!(
            out,
            "  fabric cluster {} clique {} state {} status {} -> clique id {}{}",
            f.cluster_uuid,
            f.clique_id,
            f.state,
            f.status,
            f.clique_id().as_deref().unwrap_or("none"),
            if f.is_ready() { "" } else { " (not ready)" },
        )?,
    }
    if !gpu.mig_profiles.is_empty() {
        writeln!(out, "  MIG profiles")?;
        for p in &gpu.mig_profiles {
            let starts: Vec<String> = p.placements.iter().map(|pl| pl.start.to_string()).collect();
            let c = &p.capacities;
            writeln!(
                out,
                "    {:<12} id {:>2} x{} sm {} ce {} dec {} enc {} jpg {} ofa {} mem {} MiB slices {} at {}",
                p.name,
                p.gi_profile_id,
                p.instance_count,
                c.multiprocessors,
                c.copy_engines,
                c.decoders,
                c.encoders,
                c.jpeg_engines,
                c.ofa_engines,
                c.memory_bytes >> 20,
                p.placements.first().map_or(0, |pl| pl.size),
                starts.join(","),
            )?;
        }
    }

    if !g.mig_enabled {
        writeln!(out, "  publish {}", gpu_device_name(g.minor))?;
        write_values(
            out,
            &attributes::gpu_attributes(&inv.driver, g),
            &attributes::gpu_capacities(g),
        )?;
        return Ok(());
    }
    if gpu.mig_devices.is_empty() {
        writeln!(
            out,
            "  warning: MIG enabled but no MIG devices; nothing to publish"
        )?;
    }
    for m in &gpu.mig_devices {
        writeln!(
            out,
            "  publish {} {} gi {} ci {} slices {:?}",
            m.device_name(),
            m.uuid,
            m.gi_id,
            m.ci_id,
            m.memory_slices(),
        )?;
        let nodes: Vec<String> = backend
            .mig_device_nodes(m)?
            .iter()
            .map(|n| n.host_path.display().to_string())
            .collect();
        writeln!(out, "    nodes {}", nodes.join(" "))?;
        write_values(
            out,
            &attributes::mig_attributes(&inv.driver, g, m),
            &attributes::mig_capacities(m),
        )?;
    }
    Ok(())
}

fn write_values(out: &mut impl Write, attrs: &Attributes, caps: &Capacities) -> anyhow::Result<()> {
    for (name, value) in attrs {
        let value = match value {
            AttributeValue::String(s) => format!("{s:?}"),
            AttributeValue::Version(v) => format!("version {v}"),
            AttributeValue::Int(i) => i.to_string(),
            AttributeValue::Bool(b) => b.to_string(),
        };
        writeln!(out, "    attribute {name} = {value}")?;
    }
    for (name, value) in caps {
        writeln!(out, "    capacity {name} = {value}")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(args: &[&str]) -> anyhow::Result<String> {
        let args: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
        let mut out = Vec::new();
        run(&args, &mut out)?;
        Ok(String::from_utf8(out)?)
    }

    fn profile(name: &str) -> String {
        format!("{}/profiles/{name}.yaml", env!("CARGO_MANIFEST_DIR"))
    }

    #[test]
    fn renders_every_profile_file() {
        let cases = [
            ("h100-sxm-80gb-x8", 8, "gpu-7 index 7"),
            ("h200-x8", 8, "gpu-2 index 0"),
            (
                "gb200-x4",
                4,
                "-> clique id 0fbfa579-21f7-c9ca-5f2a-5e77f05dba9f.1",
            ),
            ("a100-40gb-x8-mig", 8, "publish gpu-4-mig-3g20gb-9-0"),
            ("l4-x2", 2, "Ada Lovelace brand Nvidia cc 8.9"),
        ];
        for (name, gpus, needle) in cases {
            let text = render(&["--fake", &profile(name)]).unwrap();
            assert!(
                text.contains(&format!("\n{gpus} GPU(s)\n")),
                "{name}:\n{text}"
            );
            assert!(text.contains(needle), "{name} lacks {needle:?}:\n{text}");
        }
    }

    #[test]
    fn renders_published_values() {
        let text = render(&["--fake", "a100-40gb-x8-mig"]).unwrap();
        for needle in [
            "driver 570.172.08 (CUDA 12.8)",
            "control nodes /dev/nvidiactl /dev/nvidia-uvm /dev/nvidia-uvm-tools",
            "  publish gpu-0\n    attribute architecture = \"Ampere\"\n",
            "    attribute driverVersion = version 570.172.8\n",
            "    attribute resource.kubernetes.io/pcieRoot = \"pci0000:00\"\n",
            "    capacity memory = 42949672960\n",
            "  publish gpu-5-mig-1g5gb-19-6 MIG-a8c09f97-54c0-b2ca-d43f-d819280db58a gi 13 ci 0 slices 6..7\n",
            "    nodes /dev/nvidia5 /dev/nvidia-caps/nvidia-cap795 /dev/nvidia-caps/nvidia-cap796\n",
            "    attribute profile = \"1g.5gb\"\n",
            "    capacity memorySlice6 = 1\n",
            "  warning: MIG enabled but no MIG devices; nothing to publish",
            "    3g.20gb      id  9 x2 sm 42 ce 3 dec 2 enc 0 jpg 0 ofa 0 mem 19968 MiB slices 4 at 0,4",
        ] {
            assert!(text.contains(needle), "missing {needle:?}:\n{text}");
        }
        // MIG-enabled GPUs are not published whole.
        assert!(!text.contains("  publish gpu-4\n"), "{text}");
    }

    #[test]
    fn reports_conformance_and_writes_json() {
        let dir = tempfile::tempdir().unwrap();
        let json = dir.path().join("inventory.json");
        let text = render(&["--fake", "gb200-x4", "--json", json.to_str().unwrap()]).unwrap();
        for needle in [
            "\nimex channels 2048 channels major 507",
            "\nmodel index 0 NVIDIA GB200: matches Gb200\n",
            "\ncontract ok\n",
        ] {
            assert!(text.contains(needle), "missing {needle:?}:\n{text}");
        }
        let record: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
        assert_eq!(record["inventory"]["gpus"].as_array().unwrap().len(), 4);
        assert_eq!(record["imex"]["channel_count"], 2048);
        // The record reads back as the same inventory.
        let inv: Inventory = serde_json::from_value(record["inventory"].clone()).unwrap();
        assert!(conformance::check_inventory(&inv).is_empty());
    }

    #[test]
    fn argument_and_source_errors() {
        let cases: [(&[&str], String); 4] = [
            (
                &["--bogus"],
                format!("unknown argument \"--bogus\"\n{USAGE}"),
            ),
            (&["--fake"], format!("--fake needs a value\n{USAGE}")),
            (
                &["--fake", "no-such-profile"],
                "\"no-such-profile\" is neither a file nor a built-in profile".into(),
            ),
            (
                &["--driver-root", "/nonexistent-driver-root"],
                "opening NVML under /nonexistent-driver-root".into(),
            ),
        ];
        for (args, want) in cases {
            let err = render(args).unwrap_err();
            assert_eq!(err.to_string(), want, "{args:?}");
        }
    }
}
