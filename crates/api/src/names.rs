//! Well-known names shared by every nvdra component, in one place.
//!
//! Everything here is part of the observable contract with the upstream Go driver
//! (`dra-driver-nvidia-gpu`): driver names, API group, labels, finalizers, DeviceClass names,
//! device attribute and capacity names, CDI vendor/class strings and the leader-election Lease.
//! Changing a value breaks drop-in compatibility with existing clusters (objects labelled or
//! finalized by the Go driver, user CEL selectors, checkpoints), so values are only ever added.
//!
//! Names that are new in nvdra (field managers, condition types and reasons) follow the house
//! style instead and are free to evolve before the first release.

/// DRA driver names (`ResourceSlice.spec.driver`, `opaque.driver`, kubelet plugin names).
pub mod drivers {
    /// Full GPUs, MIG devices and VFIO passthrough devices.
    pub const GPU: &str = "gpu.nvidia.com";
    /// IMEX channels and IMEX daemons of ComputeDomains.
    pub const COMPUTE_DOMAIN: &str = "compute-domain.nvidia.com";
}

/// The API group of the CRDs and of the opaque device configuration kinds.
pub mod api_group {
    /// API group name.
    pub const GROUP: &str = "resource.nvidia.com";
    /// The only served version.
    pub const VERSION: &str = "v1beta1";
    /// `apiVersion` value of every object in the group.
    pub const API_VERSION: &str = "resource.nvidia.com/v1beta1";
}

/// `kind` values in the API group.
pub mod kinds {
    /// Opaque config for full GPUs.
    pub const GPU_CONFIG: &str = "GpuConfig";
    /// Opaque config for MIG devices.
    pub const MIG_DEVICE_CONFIG: &str = "MigDeviceConfig";
    /// Opaque config for VFIO passthrough devices.
    pub const VFIO_DEVICE_CONFIG: &str = "VfioDeviceConfig";
    /// Opaque config the controller writes into a ComputeDomain's workload claim template.
    pub const COMPUTE_DOMAIN_CHANNEL_CONFIG: &str = "ComputeDomainChannelConfig";
    /// Opaque config the controller writes into a ComputeDomain's daemon claim template.
    pub const COMPUTE_DOMAIN_DAEMON_CONFIG: &str = "ComputeDomainDaemonConfig";
    /// The ComputeDomain CRD.
    pub const COMPUTE_DOMAIN: &str = "ComputeDomain";
    /// The ComputeDomainClique CRD.
    pub const COMPUTE_DOMAIN_CLIQUE: &str = "ComputeDomainClique";
}

/// Label keys we write or read.
pub mod labels {
    /// Value: ComputeDomain UID. On Nodes (set at channel prepare), the daemon DaemonSet (and its
    /// `nodeSelector`), both ResourceClaimTemplates and ComputeDomainCliques.
    pub const COMPUTE_DOMAIN: &str = "resource.nvidia.com/computeDomain";
    /// Value: clique ID (may be empty: node not fabric-attached). On daemon pods and cliques.
    pub const COMPUTE_DOMAIN_CLIQUE_ID: &str = "resource.nvidia.com/computeDomain.cliqueID";
    /// Value: one of [`compute_domain_target`](super::compute_domain_target). On claim templates.
    pub const COMPUTE_DOMAIN_TARGET: &str = "resource.nvidia.com/computeDomainTarget";
    /// Read: GPU Feature Discovery's NVLink clique label on Nodes.
    pub const GPU_CLIQUE: &str = "nvidia.com/gpu.clique";
    /// Read: GPU Feature Discovery's "this node has a GPU" label (value `true`).
    pub const GPU_PRESENT: &str = "nvidia.com/gpu.present";
    /// Prefix of the per-domain Node label; see [`compute_domain_node_label`].
    pub const COMPUTE_DOMAIN_NODE_PREFIX: &str = "resource.nvidia.com/computeDomain.";

    /// The Node label (value `"true"`) that places a ComputeDomain's daemon on a node.
    ///
    /// Beyond upstream: upstream labels the Node `resource.nvidia.com/computeDomain=<uid>`,
    /// which allows one domain per node. One key per domain lets domains share nodes, each
    /// with its own daemon and IMEX channel. The agent sets it at channel prepare and removes
    /// it at the domain's last channel unprepare on the node; the controller removes it from
    /// every node when the domain is deleted.
    pub fn compute_domain_node_label(domain_uid: &str) -> String {
        format!("{COMPUTE_DOMAIN_NODE_PREFIX}{domain_uid}")
    }
}

/// Values of [`labels::COMPUTE_DOMAIN_TARGET`].
pub mod compute_domain_target {
    /// The claim template for the per-node IMEX daemons.
    pub const DAEMON: &str = "Daemon";
    /// The claim template users reference from their workload pods.
    pub const WORKLOAD: &str = "Workload";
}

/// Finalizers we add to objects.
pub mod finalizers {
    /// On ComputeDomains, their ResourceClaimTemplates and their daemon DaemonSet.
    pub const COMPUTE_DOMAIN: &str = "resource.nvidia.com/computeDomain";
}

/// DeviceClass names rendered by the chart.
pub mod device_classes {
    /// Full GPUs (`type == 'gpu'`).
    pub const GPU: &str = "gpu.nvidia.com";
    /// MIG devices (`type == 'mig'`).
    pub const MIG: &str = "mig.nvidia.com";
    /// VFIO passthrough GPUs (`type == 'vfio'`).
    pub const VFIO: &str = "vfio.gpu.nvidia.com";
    /// The IMEX daemon device of the compute-domain driver.
    pub const COMPUTE_DOMAIN_DAEMON: &str = "compute-domain-daemon.nvidia.com";
    /// IMEX channel 0 of the compute-domain driver.
    pub const COMPUTE_DOMAIN_DEFAULT_CHANNEL: &str = "compute-domain-default-channel.nvidia.com";
    /// Any IMEX channel. Upstream defines it but the chart does not ship it.
    pub const COMPUTE_DOMAIN_CHANNEL: &str = "compute-domain-channel.nvidia.com";
}

/// Values of the `type` device attribute, which DeviceClass selectors match on.
pub mod device_types {
    /// A full GPU.
    pub const GPU: &str = "gpu";
    /// A MIG device (static or dynamic).
    pub const MIG: &str = "mig";
    /// A GPU offered for VFIO passthrough.
    pub const VFIO: &str = "vfio";
    /// An IMEX channel.
    pub const CHANNEL: &str = "channel";
    /// An IMEX daemon.
    pub const DAEMON: &str = "daemon";
}

/// Device attribute names in ResourceSlices. Unqualified names resolve to the driver's domain
/// in CEL; only the two `resource.kubernetes.io/*` names are qualified.
pub mod attributes {
    /// Device type, one of [`device_types`](super::device_types).
    pub const TYPE: &str = "type";
    /// GPU, static MIG or VFIO UUID.
    pub const UUID: &str = "uuid";
    /// Marketing name, e.g. `NVIDIA H100 80GB HBM3`.
    pub const PRODUCT_NAME: &str = "productName";
    /// Brand, e.g. `Nvidia`.
    pub const BRAND: &str = "brand";
    /// Architecture, e.g. `Hopper`.
    pub const ARCHITECTURE: &str = "architecture";
    /// CUDA compute capability (version).
    pub const CUDA_COMPUTE_CAPABILITY: &str = "cudaComputeCapability";
    /// Kernel driver version (version).
    pub const DRIVER_VERSION: &str = "driverVersion";
    /// CUDA driver version as `major.minor` (version).
    pub const CUDA_DRIVER_VERSION: &str = "cudaDriverVersion";
    /// Memory addressing mode: `HMM`, `ATS` or `None`.
    pub const ADDRESSING_MODE: &str = "addressingMode";
    /// MIG devices: UUID of the parent GPU.
    pub const PARENT_UUID: &str = "parentUUID";
    /// MIG devices: profile, e.g. `1g.24gb`.
    pub const PROFILE: &str = "profile";
    /// VFIO devices: PCI device ID (`0x%04x`).
    pub const DEVICE_ID: &str = "deviceID";
    /// VFIO devices: PCI vendor ID (`0x%04x`).
    pub const VENDOR_ID: &str = "vendorID";
    /// VFIO devices: NUMA node (int).
    pub const NUMA: &str = "numa";
    /// VFIO devices: whether the iommufd backend is available (bool).
    pub const IOMMU_FD_ENABLED: &str = "iommuFDEnabled";
    /// Channel and daemon devices: numeric ID (int).
    pub const ID: &str = "id";
    /// Standard PCI bus ID attribute (KEP-4381).
    pub const PCI_BUS_ID: &str = "resource.kubernetes.io/pciBusID";
    /// Standard PCIe root complex attribute (KEP-4381).
    pub const PCIE_ROOT: &str = "resource.kubernetes.io/pcieRoot";
}

/// Device capacity names in ResourceSlices.
pub mod capacities {
    /// Device memory in bytes.
    pub const MEMORY: &str = "memory";
    /// Streaming multiprocessors.
    pub const MULTIPROCESSORS: &str = "multiprocessors";
    /// Copy engines.
    pub const COPY_ENGINES: &str = "copyEngines";
    /// Video decoders.
    pub const DECODERS: &str = "decoders";
    /// Video encoders.
    pub const ENCODERS: &str = "encoders";
    /// JPEG engines.
    pub const JPEG_ENGINES: &str = "jpegEngines";
    /// Optical flow accelerators.
    pub const OFA_ENGINES: &str = "ofaEngines";
    /// VFIO devices: addressable (BAR) memory.
    pub const ADDRESSABLE_MEMORY: &str = "addressableMemory";
    /// Prefix of the static-MIG `memorySlice<i>` capacities.
    pub const MEMORY_SLICE_PREFIX: &str = "memorySlice";

    /// Capacity name of memory slice `index` of a static MIG device: `memorySlice<index>`.
    pub fn memory_slice(index: u32) -> String {
        format!("{MEMORY_SLICE_PREFIX}{index}")
    }
}

/// Counter names of partitionable devices (DynamicMIG, KEP-4815). Kebab-case, unlike
/// capacities.
pub mod counters {
    /// Streaming multiprocessors.
    pub const MULTIPROCESSORS: &str = "multiprocessors";
    /// Copy engines.
    pub const COPY_ENGINES: &str = "copy-engines";
    /// Video decoders.
    pub const DECODERS: &str = "decoders";
    /// Video encoders.
    pub const ENCODERS: &str = "encoders";
    /// JPEG engines.
    pub const JPEG_ENGINES: &str = "jpeg-engines";
    /// Optical flow accelerators.
    pub const OFA_ENGINES: &str = "ofa-engines";
    /// Device memory.
    pub const MEMORY: &str = "memory";
    /// Prefix of the per-slice `memory-slice-<i>` counters.
    pub const MEMORY_SLICE_PREFIX: &str = "memory-slice-";

    /// Counter name of memory slice `index`: `memory-slice-<index>`.
    pub fn memory_slice(index: u32) -> String {
        format!("{MEMORY_SLICE_PREFIX}{index}")
    }
}

/// Device taint keys (NVMLDeviceHealthCheck, KEP-5055).
pub mod taints {
    /// Value: the XID number of the latest critical XID event.
    pub const XID: &str = "gpu.nvidia.com/xid";
    /// The GPU fell off the bus or its events became unreadable.
    pub const GPU_LOST: &str = "gpu.nvidia.com/gpu-lost";
    /// Health events could not be registered for the device.
    pub const UNMONITORED: &str = "gpu.nvidia.com/unmonitored";
}

/// CDI vendor and class names. Vendor = `k8s.` + driver name.
pub mod cdi {
    /// Vendor of the GPU driver's specs.
    pub const GPU_VENDOR: &str = "k8s.gpu.nvidia.com";
    /// Vendor of the compute-domain driver's specs.
    pub const COMPUTE_DOMAIN_VENDOR: &str = "k8s.compute-domain.nvidia.com";
    /// Class of per-claim specs (`<vendor>/claim`).
    pub const CLAIM_CLASS: &str = "claim";
    /// Class of the compute-domain driver's base spec written at startup (`<vendor>/device`).
    pub const DEVICE_CLASS: &str = "device";
    /// Device name in the compute-domain base spec (`…/device=all`).
    pub const BASE_DEVICE: &str = "all";
}

/// Server-side-apply field managers of nvdra components.
pub mod field_managers {
    /// The ComputeDomain controller.
    pub const CONTROLLER: &str = "nvdra-controller";
    /// The node agent (kubelet plugin).
    pub const AGENT: &str = "nvdra-agent";
    /// The per-node IMEX daemon.
    pub const IMEX_DAEMON: &str = "nvdra-imex-daemon";
}

/// Condition types nvdra sets on objects and Events.
pub mod conditions {
    /// The object is fully functional.
    pub const READY: &str = "Ready";
}

/// Machine-readable reasons for conditions and Events.
pub mod reasons {
    /// The node-local checkpoint could not be parsed or failed its checksum; it was set aside
    /// and state was rebuilt.
    pub const CHECKPOINT_CORRUPTED: &str = "CheckpointCorrupted";
    /// An opaque device configuration failed decoding or validation.
    pub const INVALID_DEVICE_CONFIG: &str = "InvalidDeviceConfig";
    /// Every expected IMEX daemon of a ComputeDomain is ready.
    pub const DAEMONS_READY: &str = "DaemonsReady";
    /// Fewer IMEX daemons than expected have joined, or some are not ready.
    pub const DAEMONS_NOT_READY: &str = "DaemonsNotReady";
    /// The controller failed to create, update or clean up a ComputeDomain's children.
    pub const RECONCILE_FAILED: &str = "ReconcileFailed";
    /// A ComputeDomain could not be decoded (it does not match the CRD types).
    pub const INVALID_OBJECT: &str = "InvalidObject";
    /// An IMEX daemon's `nvidia-imex` process ended and was restarted.
    pub const IMEX_RESTARTED: &str = "IMEXRestarted";
}

/// Leader-election Lease names.
pub mod leases {
    /// Default Lease of the ComputeDomain controller (the chart sets `<name>-controller`).
    pub const CONTROLLER: &str = "nvidia-compute-domain-controller";
}

/// Values of `ComputeDomain.status.status` and of per-node/per-daemon `status`.
pub mod compute_domain_status {
    /// Ready.
    pub const READY: &str = "Ready";
    /// Not ready (the default).
    pub const NOT_READY: &str = "NotReady";
}

/// Values of `ComputeDomain.spec.channel.allocationMode`.
pub mod allocation_modes {
    /// Exactly one IMEX channel (channel 0). The default.
    pub const SINGLE: &str = "Single";
    /// All IMEX channels of the domain.
    pub const ALL: &str = "All";
}

/// Names of objects the controller creates per ComputeDomain, and of their parts.
pub mod objects {
    /// Name prefix of the daemon DaemonSet and daemon ResourceClaimTemplate:
    /// `computedomain-daemon-<cdUID>`.
    pub const DAEMON_PREFIX: &str = "computedomain-daemon-";
    /// ServiceAccount of the daemon pods.
    pub const DAEMON_SERVICE_ACCOUNT: &str = "compute-domain-daemon-service-account";
    /// Container name of the daemon pods.
    pub const DAEMON_CONTAINER: &str = "compute-domain-daemon";
    /// Request name in the daemon ResourceClaimTemplate.
    pub const DAEMON_REQUEST: &str = "daemon";
    /// Request name in the workload ResourceClaimTemplate.
    pub const CHANNEL_REQUEST: &str = "channel";
    /// Name prefix of per-claim MPS control daemon Deployments.
    pub const MPS_CONTROL_DAEMON_PREFIX: &str = "mps-control-daemon-";

    /// The daemon binary (command of the daemon DaemonSet's container).
    pub const DAEMON_BINARY: &str = "nvdra-imex-daemon";

    /// Name of the daemon DaemonSet and daemon ResourceClaimTemplate of a ComputeDomain.
    pub fn daemon_name(compute_domain_uid: &str) -> String {
        format!("{DAEMON_PREFIX}{compute_domain_uid}")
    }

    /// Name of the ComputeDomainClique of a domain's daemons in one NVLink clique:
    /// `<cdUID>.<cliqueID>`.
    pub fn clique_name(compute_domain_uid: &str, clique_id: &str) -> String {
        format!("{compute_domain_uid}.{clique_id}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_names() {
        assert_eq!(capacities::memory_slice(3), "memorySlice3");
        assert_eq!(counters::memory_slice(0), "memory-slice-0");
        assert_eq!(objects::daemon_name("abc"), "computedomain-daemon-abc");
        assert_eq!(objects::clique_name("abc", "c.1"), "abc.c.1");
        assert_eq!(
            labels::compute_domain_node_label("abc"),
            "resource.nvidia.com/computeDomain.abc"
        );
        assert_eq!(
            api_group::API_VERSION,
            format!("{}/{}", api_group::GROUP, api_group::VERSION)
        );
        // CDI vendors are `k8s.` + driver name.
        assert_eq!(cdi::GPU_VENDOR, format!("k8s.{}", drivers::GPU));
        assert_eq!(
            cdi::COMPUTE_DOMAIN_VENDOR,
            format!("k8s.{}", drivers::COMPUTE_DOMAIN)
        );
    }
}
