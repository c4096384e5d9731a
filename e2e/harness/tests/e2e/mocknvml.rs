//! The mock-NVML scenario, on its own two-node cluster (`mock_nvml_spec`):
//! `fake-a100` runs the agent on the fake backend, `nvml-a100` runs it on the
//! NVML backend over the mock `libnvidia-ml.so.1`, both with the built-in
//! `a100-40gb-x8-mig` profile. The NVML node must be indistinguishable to
//! the cluster: the same devices, attributes and capacities in its
//! ResourceSlices, and claims prepared from what NVML and the driver's procfs
//! report.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::resource::v1::{ResourceClaim, ResourceSlice};
use kube::Api;
use kube::api::ListParams;
use nvdra_gpu::MigCapabilities;
use serde_json::Value;

use super::env::{Env, RUNNING, allocated, container_edits, node_of, uid};

/// The node whose agent runs the NVML backend over the mock library.
pub const NVML_NODE: &str = "nvml-a100";
/// The node whose agent runs the fake backend, same profile.
pub const FAKE_NODE: &str = "fake-a100";

/// The one device allocated to `claim`, which must come from `node`'s pool.
fn the_device_from(claim: &ResourceClaim, node: &str) -> Result<String> {
    let devices = allocated(claim);
    let [(pool, name)] = devices.as_slice() else {
        anyhow::bail!("{}: not one device: {devices:?}", uid(claim));
    };
    ensure!(pool == node, "{name} allocated from {pool}, not {node}");
    Ok(name.clone())
}

/// Every device a node's agents publish, by (driver, device name), as JSON.
async fn published(env: &Env, node: &str) -> Result<BTreeMap<(String, String), Value>> {
    let slices: Api<ResourceSlice> = Api::all(env.client.clone());
    let list = slices
        .list(&ListParams::default().fields(&format!("spec.nodeName={node}")))
        .await?;
    let mut devices = BTreeMap::new();
    for slice in list.items {
        for device in slice.spec.devices.iter().flatten() {
            devices.insert(
                (slice.spec.driver.clone(), device.name.clone()),
                serde_json::to_value(device)?,
            );
        }
    }
    Ok(devices)
}

/// The scenario: same slices; a pod with a full GPU and a MIG device on the
/// NVML node is prepared with the capability minors the mock driver's procfs
/// gives; deleting it unprepares.
pub async fn mock_nvml_node(env: Arc<Env>) -> Result<()> {
    // The cluster is up once the GPU pools are published; the
    // compute-domain pools may follow a moment later.
    let differing = || async {
        let nvml = published(&env, NVML_NODE).await?;
        let fake = published(&env, FAKE_NODE).await?;
        ensure!(!nvml.is_empty(), "{NVML_NODE} publishes nothing");
        Ok(fake
            .keys()
            .chain(nvml.keys())
            .filter(|k| fake.get(*k) != nvml.get(*k))
            .cloned()
            .collect::<Vec<_>>())
    };
    let settled = nvdra_e2e::wait::until(
        Duration::from_secs(30),
        "both nodes to publish the same devices",
        || async { Ok(differing().await?.is_empty()) },
    )
    .await;
    if settled.is_err() {
        let differing = differing().await?;
        anyhow::bail!("devices differ between the NVML and the fake node: {differing:?}");
    }

    let ns = env.namespace("e2e-mock-nvml").await?;
    env.apply(&format!(
        "apiVersion: resource.k8s.io/v1
kind: ResourceClaimTemplate
metadata: {{ namespace: {ns}, name: full-gpu }}
spec:
  spec:
    devices:
      requests:
      - name: gpu
        exactly: {{ deviceClassName: gpu.nvidia.com }}
---
apiVersion: resource.k8s.io/v1
kind: ResourceClaimTemplate
metadata: {{ namespace: {ns}, name: mig-3g }}
spec:
  spec:
    devices:
      requests:
      - name: mig
        exactly:
          deviceClassName: mig.nvidia.com
          selectors:
          - cel:
              expression: \"device.attributes['gpu.nvidia.com'].profile == '3g.20gb'\"
"
    ))?;
    env.create_pod(
        &ns,
        "on-nvml",
        &[
            ("gpu", "template", "full-gpu"),
            ("mig", "template", "mig-3g"),
        ],
        Some(NVML_NODE),
    )
    .await?;
    let pod = env.running(&ns, "on-nvml", RUNNING).await?;
    ensure!(node_of(&pod) == NVML_NODE, "scheduled on {}", node_of(&pod));

    let mig_claim = env.pod_claim(&pod, "mig").await?;
    let name = &the_device_from(&mig_claim, NVML_NODE)?;
    let spec = env
        .cluster
        .node(NVML_NODE)?
        .inventory()?
        .gpus
        .iter()
        .flat_map(|g| g.mig_devices.iter())
        .find(|m| &m.device_name() == name)
        .cloned()
        .with_context(|| format!("{name} is not a MIG device of the profile"))?;
    let minors = MigCapabilities::from_driver_layout(spec.parent_minor, spec.gi_id, spec.ci_id);
    let spec_path = env.cdi_spec(NVML_NODE, &uid(&mig_claim));
    let cdi = std::fs::read_to_string(&spec_path)
        .with_context(|| format!("read {}", spec_path.display()))?;
    for minor in [minors.gi_minor, minors.ci_minor] {
        let node = format!("/dev/nvidia-caps/nvidia-cap{minor}");
        ensure!(
            cdi.contains(&node),
            "the CDI spec of {name} lacks {node} (from the mock driver's procfs):\n{cdi}"
        );
    }
    let gpu_claim = env.pod_claim(&pod, "gpu").await?;
    ensure!(
        allocated(&gpu_claim).iter().all(|(p, _)| p == NVML_NODE),
        "full GPU from {NVML_NODE}"
    );

    env.delete_pod(&ns, "on-nvml", Duration::from_secs(60))
        .await?;
    ensure!(
        !spec_path.exists(),
        "CDI spec {} left behind",
        spec_path.display()
    );
    Ok(())
}

/// What the NVML node's `nvidia-smi` stand-in was asked, one command a line.
fn nvidia_smi_calls(env: &Env) -> Result<Vec<String>> {
    let path = env
        .cluster
        .node_dirs(NVML_NODE)
        .dir
        .join("driver-root/usr/bin/nvidia-smi.calls");
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok(text.lines().map(str::to_owned).collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e).with_context(|| format!("read {}", path.display())),
    }
}

/// Time-slicing on the NVML node (the cluster runs with
/// `TimeSlicingSettings`): two pods share one claim's GPU configured with
/// the `Long` interval; the agent set it through the driver root's
/// `nvidia-smi` (and NVML's compute mode, which stays `Default`), and resets
/// it to `Default` once neither pod uses the claim.
pub async fn time_slicing_shares_a_gpu(env: Arc<Env>) -> Result<()> {
    let ns = env.namespace("e2e-time-slicing").await?;
    env.apply(&format!(
        "apiVersion: resource.k8s.io/v1
kind: ResourceClaim
metadata: {{ namespace: {ns}, name: shared-long }}
spec:
  devices:
    requests:
    - name: gpu
      exactly: {{ deviceClassName: gpu.nvidia.com }}
    config:
    - requests: [gpu]
      opaque:
        driver: gpu.nvidia.com
        parameters:
          apiVersion: resource.nvidia.com/v1beta1
          kind: GpuConfig
          sharing:
            strategy: TimeSlicing
            timeSlicingConfig: {{ interval: Long }}
"
    ))?;
    for pod in ["ts-a", "ts-b"] {
        env.create_pod(
            &ns,
            pod,
            &[("gpu", "claim", "shared-long")],
            Some(NVML_NODE),
        )
        .await?;
    }
    let a = env.running(&ns, "ts-a", RUNNING).await?;
    env.running(&ns, "ts-b", RUNNING).await?;
    let claim = env.pod_claim(&a, "gpu").await?;
    let name = &the_device_from(&claim, NVML_NODE)?;
    let uuid = env
        .cluster
        .node(NVML_NODE)?
        .inventory()?
        .gpus
        .iter()
        .find(|g| format!("gpu-{}", g.info.minor) == *name)
        .map(|g| g.info.uuid.clone())
        .with_context(|| format!("{name} is not a full GPU of the profile"))?;
    let set = format!("compute-policy -i {uuid} --set-timeslice=3");
    let calls = nvidia_smi_calls(&env)?;
    ensure!(
        calls.contains(&set),
        "nvidia-smi was not asked for the Long slice ({set}); it was asked {calls:?}"
    );
    // The compute mode is NVML's, kept by the mock in its state file: a
    // time-sliced GPU stays in the default mode (no entry).
    let state = mock_state(&env, NVML_NODE)?;
    let mode = &state["compute_modes"][&uuid];
    ensure!(
        mode.is_null(),
        "the mock recorded compute mode {mode} for {uuid}, not the default"
    );

    for pod in ["ts-a", "ts-b"] {
        env.delete_pod(&ns, pod, Duration::from_secs(60)).await?;
    }
    let reset = format!("compute-policy -i {uuid} --set-timeslice=0");
    nvdra_e2e::wait::until(
        Duration::from_secs(30),
        "the time slice to be reset after the last pod",
        || async {
            let calls = nvidia_smi_calls(&env)?;
            let set_at = calls.iter().rposition(|c| *c == set);
            let reset_at = calls.iter().rposition(|c| *c == reset);
            Ok(matches!((set_at, reset_at), (Some(s), Some(r)) if r > s))
        },
    )
    .await
}

/// What the NVML node's MPS control stand-in did, one action a line, each
/// prefixed with the daemon's pipe directory.
fn mps_calls(env: &Env) -> Result<Vec<String>> {
    let path = env
        .cluster
        .node_dirs(NVML_NODE)
        .dir
        .join("driver-root/usr/bin/nvidia-cuda-mps-control.calls");
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok(text.lines().map(str::to_owned).collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e).with_context(|| format!("read {}", path.display())),
    }
}

/// MPS on the NVML node (the cluster runs with `MPSSupport`): two pods
/// share one claim's GPU configured for MPS with a thread percentage and a
/// pinned-memory limit. The agent set the GPU to exclusive-process through
/// NVML, started the claim's control daemon from the driver root (the
/// stand-in records what it was told: the GPU and both limits), and gave
/// the containers the daemon's pipe directory; after the last pod the
/// daemon is told to quit and the compute mode is back to `Default`.
pub async fn mps_shares_a_gpu(env: Arc<Env>) -> Result<()> {
    let ns = env.namespace("e2e-mps").await?;
    env.apply(&format!(
        "apiVersion: resource.k8s.io/v1
kind: ResourceClaim
metadata: {{ namespace: {ns}, name: shared-mps }}
spec:
  devices:
    requests:
    - name: gpu
      exactly: {{ deviceClassName: gpu.nvidia.com }}
    config:
    - requests: [gpu]
      opaque:
        driver: gpu.nvidia.com
        parameters:
          apiVersion: resource.nvidia.com/v1beta1
          kind: GpuConfig
          sharing:
            strategy: MPS
            mpsConfig:
              defaultActiveThreadPercentage: 50
              defaultPinnedDeviceMemoryLimit: 8Gi
"
    ))?;
    for pod in ["mps-a", "mps-b"] {
        env.create_pod(&ns, pod, &[("gpu", "claim", "shared-mps")], Some(NVML_NODE))
            .await?;
    }
    let a = env.running(&ns, "mps-a", RUNNING).await?;
    env.running(&ns, "mps-b", RUNNING).await?;
    let claim = env.pod_claim(&a, "gpu").await?;
    let name = &the_device_from(&claim, NVML_NODE)?;
    let uuid = env
        .cluster
        .node(NVML_NODE)?
        .inventory()?
        .gpus
        .iter()
        .find(|g| format!("gpu-{}", g.info.minor) == *name)
        .map(|g| g.info.uuid.clone())
        .with_context(|| format!("{name} is not a full GPU of the profile"))?;

    // One daemon for the shared claim, told the GPU and both limits.
    let calls = mps_calls(&env)?;
    let told = |what: &str| calls.iter().filter(|c| c.ends_with(what)).count();
    ensure!(
        told(&format!(" start CUDA_VISIBLE_DEVICES={uuid}")) == 1
            && told(" set_default_active_thread_percentage 50") == 1
            && told(&format!(
                " set_default_device_pinned_mem_limit {uuid} 8192M"
            )) == 1,
        "the MPS daemon was not started once with the claim's settings: {calls:?}"
    );
    let state = mock_state(&env, NVML_NODE)?;
    let mode = &state["compute_modes"][&uuid];
    ensure!(
        mode == "ExclusiveProcess",
        "the mock recorded compute mode {mode} for {uuid} while MPS runs"
    );
    let spec_path = env.cdi_spec(NVML_NODE, &uid(&claim));
    let cdi = std::fs::read_to_string(&spec_path)
        .with_context(|| format!("read {}", spec_path.display()))?;
    ensure!(
        cdi.contains("CUDA_MPS_PIPE_DIRECTORY=/tmp/nvidia-mps") && cdi.contains("/dev/shm"),
        "the CDI spec lacks the MPS pipe directory or shm:\n{cdi}"
    );

    for pod in ["mps-a", "mps-b"] {
        env.delete_pod(&ns, pod, Duration::from_secs(60)).await?;
    }
    nvdra_e2e::wait::until(
        Duration::from_secs(30),
        "the MPS daemon to stop and the compute mode to be restored",
        || async {
            let calls = mps_calls(&env)?;
            let stopped = calls.iter().any(|c| c.ends_with(" quit"))
                && calls.iter().any(|c| c.ends_with(" stop"));
            let state = mock_state(&env, NVML_NODE)?;
            Ok(stopped && state["compute_modes"][&uuid].is_null())
        },
    )
    .await
}

/// Device health on the NVML node (the cluster runs with
/// `NVMLDeviceHealthCheck`): a pod runs on a GPU; an Xid for that GPU,
/// written to the mock library's events file, reaches the agent through
/// NVML's event API. The agent taints the device in the ResourceSlice, and
/// its resource-health stream marks it unhealthy, which the kubelet shows in
/// the running pod's `allocatedResourcesStatus`. The real scheduler gives a
/// new claim another GPU. Annotating the Node with the device clears the
/// taint and the pod's device is healthy again.
pub async fn xid_taints_a_device(env: Arc<Env>) -> Result<()> {
    let ns = env.namespace("e2e-health").await?;
    let claim = |name: &str| {
        format!(
            "apiVersion: resource.k8s.io/v1
kind: ResourceClaim
metadata: {{ namespace: {ns}, name: {name} }}
spec:
  devices:
    requests:
    - name: gpu
      exactly: {{ deviceClassName: gpu.nvidia.com }}
"
        )
    };
    env.apply(&claim("victim-gpu"))?;
    env.create_pod(
        &ns,
        "victim",
        &[("gpu", "claim", "victim-gpu")],
        Some(NVML_NODE),
    )
    .await?;
    let victim = env.running(&ns, "victim", RUNNING).await?;
    let name = the_device_from(&env.pod_claim(&victim, "gpu").await?, NVML_NODE)?;
    let devices = published(&env, NVML_NODE).await?;
    let uuid = devices
        .get(&("gpu.nvidia.com".to_owned(), name.clone()))
        .and_then(|d| d["attributes"]["uuid"]["string"].as_str())
        .with_context(|| format!("{name} has no uuid"))?
        .to_owned();
    let driver_root = env.cluster.node_dirs(NVML_NODE).dir.join("driver-root");
    let event = nvdra_gpu::health::HealthEvent::gpu(
        uuid.clone(),
        nvdra_gpu::health::HealthEventKind::Xid(79),
    );
    nvdra_nvml_mock::config::append_event(
        &nvdra_nvml_mock::layout::events_file(&driver_root),
        &event,
    )
    .map_err(anyhow::Error::msg)?;
    let taint_of = |devices: &BTreeMap<(String, String), Value>| {
        devices
            .get(&("gpu.nvidia.com".to_owned(), name.clone()))
            .map(|d| d["taints"].clone())
            .unwrap_or(Value::Null)
    };
    nvdra_e2e::wait::until(
        Duration::from_secs(30),
        &format!("{name} to be tainted with Xid 79"),
        || async {
            let taints = taint_of(&published(&env, NVML_NODE).await?);
            Ok(taints[0]["key"] == "gpu.nvidia.com/xid"
                && taints[0]["value"] == "79"
                && taints[0]["effect"] == "NoSchedule")
        },
    )
    .await?;
    // The kubelet shows it in the running pod's status.
    let resource_id = format!("gpu.nvidia.com/{NVML_NODE}/{name}");
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), &ns);
    let health_in_pod = |want: &'static str| {
        let pods = pods.clone();
        let resource_id = resource_id.clone();
        async move {
            let pod = pods.get("victim").await?;
            let status = serde_json::to_value(&pod.status)?;
            let entries = &status["containerStatuses"][0]["allocatedResourcesStatus"];
            Ok::<bool, anyhow::Error>(entries.as_array().into_iter().flatten().any(|e| {
                e["name"] == "claim:gpu"
                    && e["resources"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .any(|r| r["resourceID"] == resource_id.as_str() && r["health"] == want)
            }))
        }
    };
    nvdra_e2e::wait::until(
        Duration::from_secs(30),
        "the pod's status to show its device unhealthy",
        || health_in_pod("Unhealthy"),
    )
    .await?;

    env.apply(&claim("healthy-gpu"))?;
    env.create_pod(
        &ns,
        "avoids",
        &[("gpu", "claim", "healthy-gpu")],
        Some(NVML_NODE),
    )
    .await?;
    let pod = env.running(&ns, "avoids", RUNNING).await?;
    let got = the_device_from(&env.pod_claim(&pod, "gpu").await?, NVML_NODE)?;
    ensure!(got != name, "the scheduler allocated the tainted {name}");
    env.delete_pod(&ns, "avoids", Duration::from_secs(60))
        .await?;

    // The operator clears it.
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(env.client.clone());
    let patch = serde_json::json!({"metadata": {"annotations": {
        "gpu.nvidia.com/clear-health-taints": name,
    }}});
    nodes
        .patch(
            NVML_NODE,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&patch),
        )
        .await?;
    nvdra_e2e::wait::until(
        Duration::from_secs(30),
        &format!("the taint of {name} to be cleared"),
        || async { Ok(taint_of(&published(&env, NVML_NODE).await?).is_null()) },
    )
    .await?;
    nvdra_e2e::wait::until(
        Duration::from_secs(30),
        "the pod's status to show its device healthy again",
        || health_in_pod("Healthy"),
    )
    .await?;
    env.delete_pod(&ns, "victim", Duration::from_secs(60)).await
}

/// The node of the passthrough cluster: an H100 node on the mock library.
pub const PASSTHROUGH_NODE: &str = "vfio-h100";

/// VFIO passthrough on a mock-NVML H100 node with a fake PCI sysfs tree (a
/// fake kernel rebinds devices when the agent writes the driver files): a
/// pod asks for a `vfio.gpu.nvidia.com` device; the agent binds its GPU to
/// vfio-pci, the CDI spec gives the container the IOMMU group's node and no
/// driver files, the container finds the GPU's PCI address in its KEP-5304
/// device metadata file (`DeviceMetadata`), and the GPU's `gpu-<minor>`
/// sibling leaves the ResourceSlice; deleting the pod binds the GPU back to
/// nvidia, removes the metadata and offers the GPU as a GPU again.
pub async fn vfio_passthrough_claim(env: Arc<Env>) -> Result<()> {
    let sysfs = env.cluster.node_dirs(PASSTHROUGH_NODE).dir.join("sys");
    let _kernel = nvdra_nvml_mock::pci::FakeKernel::spawn(&sysfs).map_err(anyhow::Error::msg)?;
    let ns = env.namespace("e2e-vfio").await?;
    env.apply(&format!(
        "apiVersion: resource.k8s.io/v1
kind: ResourceClaim
metadata: {{ namespace: {ns}, name: vm-gpu }}
spec:
  devices:
    requests:
    - name: vm
      exactly: {{ deviceClassName: vfio.gpu.nvidia.com }}
"
    ))?;
    env.create_pod(
        &ns,
        "vm",
        &[("vm", "claim", "vm-gpu")],
        Some(PASSTHROUGH_NODE),
    )
    .await?;
    let pod = env.running(&ns, "vm", RUNNING).await?;
    let claim = env.pod_claim(&pod, "vm").await?;
    let name = the_device_from(&claim, PASSTHROUGH_NODE)?;
    let before = published(&env, PASSTHROUGH_NODE).await?;
    let device = before
        .get(&("gpu.nvidia.com".to_owned(), name.clone()))
        .with_context(|| format!("{name} is not published"))?;
    let bdf = device["attributes"]["resource.kubernetes.io/pciBusID"]["string"]
        .as_str()
        .with_context(|| format!("{name} has no PCI bus ID: {device}"))?
        .to_owned();
    let driver = || nvdra_gpu::vfio::current_driver(&sysfs, &bdf);
    ensure!(
        driver()? == nvdra_gpu::vfio::PciDriver::VfioPci,
        "{bdf} is on {}, not vfio-pci, while the pod runs",
        driver()?
    );
    let group = nvdra_gpu::vfio::iommu_group(&sysfs, &bdf)?;
    let spec_path = env.cdi_spec(PASSTHROUGH_NODE, &uid(&claim));
    let cdi = std::fs::read_to_string(&spec_path)
        .with_context(|| format!("read {}", spec_path.display()))?;
    ensure!(
        cdi.contains(&format!("/dev/vfio/{group}"))
            && cdi.contains("NVIDIA_VISIBLE_DEVICES=void")
            && !cdi.contains("libnvidia-ml"),
        "the CDI spec is not a passthrough spec for group {group}:\n{cdi}"
    );
    let metadata = metadata_file(&env, &pod, "vm-gpu", "vm")?;
    let object: Value = serde_json::from_str(
        std::fs::read_to_string(&metadata)
            .with_context(|| format!("read {}", metadata.display()))?
            .lines()
            .next()
            .context("an empty metadata file")?,
    )?;
    let described = &object["requests"][0]["devices"][0];
    ensure!(
        object["apiVersion"] == "metadata.resource.k8s.io/v1beta1"
            && object["metadata"]["uid"] == uid(&claim).as_str()
            && described["name"] == name.as_str()
            && described["attributes"]["resource.kubernetes.io/pciBusID"]["string"] == bdf.as_str(),
        "the device metadata does not describe {name} at {bdf}: {object}"
    );
    // The same GPU is not on offer as a GPU while it is passed through.
    let sibling = |devices: &BTreeMap<(String, String), Value>| {
        devices.iter().any(|((_, n), d)| {
            !n.contains("vfio")
                && d["attributes"]["resource.kubernetes.io/pciBusID"]["string"] == bdf.as_str()
        })
    };
    nvdra_e2e::wait::until(
        Duration::from_secs(30),
        "the passed-through GPU to leave the ResourceSlice as a GPU",
        || async { Ok(!sibling(&published(&env, PASSTHROUGH_NODE).await?)) },
    )
    .await?;

    env.delete_pod(&ns, "vm", Duration::from_secs(60)).await?;
    ensure!(
        !metadata.exists(),
        "{} outlived the claim",
        metadata.display()
    );
    ensure!(
        driver()? == nvdra_gpu::vfio::PciDriver::Nvidia,
        "{bdf} is on {} after the pod, not nvidia",
        driver()?
    );
    nvdra_e2e::wait::until(
        Duration::from_secs(30),
        "the GPU to be offered as a GPU again",
        || async { Ok(sibling(&published(&env, PASSTHROUGH_NODE).await?)) },
    )
    .await
}

/// The host file the emulator mounted in `pod`'s containers as the device metadata of
/// `request` of the claim named `claim`.
fn metadata_file(env: &Env, pod: &Pod, claim: &str, request: &str) -> Result<std::path::PathBuf> {
    let edits = container_edits(env, pod)?;
    let wanted = format!(
        "/var/run/kubernetes.io/dra-device-attributes/resourceclaims/{claim}/{request}/gpu.nvidia.com-metadata.json"
    );
    edits["mounts"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m["containerPath"] == wanted.as_str())
        .and_then(|m| m["hostPath"].as_str())
        .map(std::path::PathBuf::from)
        .with_context(|| format!("no mount at {wanted} in the pod's container edits: {edits}"))
}

/// The node of the DynamicMIG cluster: an H100 node on the mock library.
pub const DYNAMIC_NODE: &str = "dmig-h100";

/// DynamicMIG on a mock-NVML H100 node: four pods ask for MIG devices of
/// mixed profiles (one 3g.40gb, three 1g.10gb) on the same GPU. The real
/// scheduler places them from the published partitions and counters
/// without overlap, in whatever order it schedules them; the agent creates
/// each MIG device through NVML (the mock's state shows four instances on
/// disjoint memory slices) and destroys them when the pods go, turning MIG
/// off again.
pub async fn dynamic_mig_mixed_profiles(env: Arc<Env>) -> Result<()> {
    let inventory = env.cluster.node(DYNAMIC_NODE)?.inventory()?;
    let gpu = inventory.gpus.first().context("the profile has GPUs")?;
    let uuid = gpu.info.uuid.clone();
    let ns = env.namespace("e2e-dynamic-mig").await?;
    for (name, profile) in [("mig-3g", "3g.40gb"), ("mig-1g", "1g.10gb")] {
        env.apply(&format!(
            "apiVersion: resource.k8s.io/v1
kind: ResourceClaimTemplate
metadata: {{ namespace: {ns}, name: {name} }}
spec:
  spec:
    devices:
      requests:
      - name: mig
        exactly:
          deviceClassName: mig.nvidia.com
          selectors:
          - cel:
              expression: \"device.attributes['gpu.nvidia.com'].profile == '{profile}' && device.attributes['gpu.nvidia.com'].parentUUID == '{uuid}'\"
"
        ))?;
    }
    let pods = [
        ("small-a", "mig-1g"),
        ("big", "mig-3g"),
        ("small-b", "mig-1g"),
        ("small-c", "mig-1g"),
    ];
    for (pod, template) in pods {
        env.create_pod(
            &ns,
            pod,
            &[("mig", "template", template)],
            Some(DYNAMIC_NODE),
        )
        .await?;
    }
    let mut allocated_names = Vec::new();
    for (pod, _) in pods {
        let running = env.running(&ns, pod, RUNNING).await?;
        let claim = env.pod_claim(&running, "mig").await?;
        allocated_names.push(the_device_from(&claim, DYNAMIC_NODE)?);
    }
    // What the mock driver holds: four MIG devices on GPU 0, pairwise
    // disjoint, exactly the allocated partitions.
    let state = mock_state(&env, DYNAMIC_NODE)?;
    let migs = state["inventory"]["gpus"][0]["mig_devices"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let mut slices = Vec::new();
    let mut created = Vec::new();
    for mig in &migs {
        let start = mig["placement"]["start"]
            .as_u64()
            .context("placement start")?;
        let size = mig["placement"]["size"]
            .as_u64()
            .context("placement size")?;
        slices.extend(start..start + size);
        created.push(format!(
            "gpu-0-mig-{}-{}-{start}",
            mig["profile"].as_str().unwrap_or_default().replace('.', ""),
            mig["gi_profile_id"]
        ));
    }
    created.sort();
    allocated_names.sort();
    ensure!(
        created == allocated_names,
        "MIG devices {created:?} are not the allocated partitions {allocated_names:?}"
    );
    let before = slices.len();
    slices.sort_unstable();
    slices.dedup();
    ensure!(slices.len() == before, "overlapping MIG devices: {migs:?}");

    for (pod, _) in pods {
        env.delete_pod(&ns, pod, Duration::from_secs(60)).await?;
    }
    nvdra_e2e::wait::until(
        Duration::from_secs(30),
        "the MIG devices to be destroyed and MIG turned off",
        || async {
            let state = mock_state(&env, DYNAMIC_NODE)?;
            let gpu = &state["inventory"]["gpus"][0];
            Ok(gpu["mig_devices"].as_array().is_none_or(Vec::is_empty)
                && gpu["info"]["mig_enabled"] == Value::Bool(false))
        },
    )
    .await
}

/// The mock NVML library's state file of `node`.
fn mock_state(env: &Env, node: &str) -> Result<Value> {
    let path = env.cluster.node_dirs(node).dir.join("mock-nvml-state.json");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
    Ok(serde_json::from_str(&text)?)
}
