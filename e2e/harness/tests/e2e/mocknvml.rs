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
use k8s_openapi::api::resource::v1::ResourceSlice;
use kube::Api;
use kube::api::ListParams;
use nvdra_gpu::MigCapabilities;
use serde_json::Value;

use super::env::{Env, RUNNING, allocated, node_of, uid};

/// The node whose agent runs the NVML backend over the mock library.
pub const NVML_NODE: &str = "nvml-a100";
/// The node whose agent runs the fake backend, same profile.
pub const FAKE_NODE: &str = "fake-a100";

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
    let nvml = published(&env, NVML_NODE).await?;
    let fake = published(&env, FAKE_NODE).await?;
    ensure!(!nvml.is_empty(), "{NVML_NODE} publishes nothing");
    let differing: Vec<_> = fake
        .keys()
        .chain(nvml.keys())
        .filter(|k| fake.get(*k) != nvml.get(*k))
        .collect();
    ensure!(
        differing.is_empty(),
        "devices differ between the NVML and the fake node: {differing:?}"
    );

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
    let devices = allocated(&mig_claim);
    ensure!(devices.len() == 1, "one MIG device allocated: {devices:?}");
    let (pool, name) = &devices[0];
    ensure!(pool == NVML_NODE, "allocated from {pool}");
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
