//! Pod and node IP addresses.
//!
//! Without `--pod-cidr` every pod and the node share `127.0.0.1`, which is enough as long as
//! nothing tells pods apart by address. With `--pod-cidr 127.A.B.0/24` the node's InternalIP
//! is `.1` and each pod gets the lowest free address from `.2` up to `.254`: distinct loopback
//! addresses, all reachable on this machine, so per-pod addresses (the IMEX daemons' peer
//! lists) mean something. `hostNetwork` pods get the node's address, as on a real node.
//!
//! Invariants: an address belongs to at most one pod UID; it is released when the pod's
//! worker finishes (pod deleted). After an emulator restart the addresses running pods already
//! show in `status.podIP` are reserved for them again before any new pod is given one
//! ([`IpPool::reserve`] during the initial list, [`IpPool::wait_synced`] before assigning).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::Mutex;

use k8s_openapi::api::core::v1::Pod;
use tokio::sync::watch;

/// Every address when no `--pod-cidr` is given.
pub const LOOPBACK: &str = "127.0.0.1";
/// The first host number handed to pods (`.1` is the node).
pub const FIRST_POD_HOST: u8 = 2;
/// The last host number handed to pods (`.255` is the broadcast address).
pub const LAST_POD_HOST: u8 = 254;

/// A `/24` pod network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PodCidr {
    net: [u8; 3],
}

impl PodCidr {
    /// The address of host number `host` in the network.
    pub fn host(self, host: u8) -> Ipv4Addr {
        Ipv4Addr::new(self.net[0], self.net[1], self.net[2], host)
    }

    /// The host number of `ip` if it lies in the network.
    pub fn host_of(self, ip: &str) -> Option<u8> {
        let ip: Ipv4Addr = ip.parse().ok()?;
        let o = ip.octets();
        (o[..3] == self.net).then_some(o[3])
    }
}

impl std::fmt::Display for PodCidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/24", self.host(0))
    }
}

/// `A.B.C.0/24`; only `/24` networks are supported.
pub fn parse_pod_cidr(s: &str) -> Result<PodCidr, String> {
    let bad = || format!("{s:?} is not a /24 network like 127.1.3.0/24");
    let (addr, len) = s.split_once('/').ok_or_else(bad)?;
    let addr: Ipv4Addr = addr.parse().map_err(|_| bad())?;
    if len != "24" {
        return Err(bad());
    }
    let o = addr.octets();
    if o[3] != 0 {
        return Err(format!(
            "{s:?} has host bits set; write {}.{}.{}.0/24",
            o[0], o[1], o[2]
        ));
    }
    Ok(PodCidr {
        net: [o[0], o[1], o[2]],
    })
}

/// The addresses one pod shows in its status and downward API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Addresses {
    /// `status.hostIP`: the node's address.
    pub host: String,
    /// `status.podIP`.
    pub pod: String,
}

impl Addresses {
    /// Both on `127.0.0.1` (no `--pod-cidr`).
    pub fn loopback() -> Self {
        Self {
            host: LOOPBACK.to_owned(),
            pod: LOOPBACK.to_owned(),
        }
    }
}

/// The lowest pod host number not in `used`.
pub fn lowest_free(used: impl IntoIterator<Item = u8>) -> Option<u8> {
    let used: std::collections::BTreeSet<u8> = used.into_iter().collect();
    (FIRST_POD_HOST..=LAST_POD_HOST).find(|h| !used.contains(h))
}

/// The node's pod addresses.
#[derive(Debug)]
pub struct IpPool {
    cidr: Option<PodCidr>,
    /// Pod UID → host number.
    taken: Mutex<BTreeMap<String, u8>>,
    synced: watch::Sender<bool>,
}

impl IpPool {
    /// A pool over `cidr` (none: everything on the loopback address).
    pub fn new(cidr: Option<PodCidr>) -> Self {
        Self {
            cidr,
            taken: Mutex::default(),
            synced: watch::channel(false).0,
        }
    }

    fn taken(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, u8>> {
        // Plain data: a panic elsewhere leaves it usable.
        self.taken
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The node's InternalIP.
    pub fn node_ip(&self) -> String {
        self.cidr
            .map_or_else(|| LOOPBACK.to_owned(), |c| c.host(1).to_string())
    }

    /// Keeps for `uid` the address `pod` already shows, if it is a pod address of the network
    /// that no other pod holds. Called for every pod of the initial list.
    pub fn reserve(&self, pod: &Pod) {
        let (Some(cidr), Some(uid)) = (self.cidr, pod.metadata.uid.as_ref()) else {
            return;
        };
        let Some(host) = pod
            .status
            .as_ref()
            .and_then(|s| s.pod_ip.as_deref())
            .and_then(|ip| cidr.host_of(ip))
            .filter(|h| (FIRST_POD_HOST..=LAST_POD_HOST).contains(h))
        else {
            return;
        };
        let mut taken = self.taken();
        if !taken.values().any(|h| *h == host) {
            taken.entry(uid.clone()).or_insert(host);
        }
    }

    /// Marks the initial list as reserved: assignments may start.
    pub fn mark_synced(&self) {
        self.synced.send_replace(true);
    }

    /// Waits until [`IpPool::mark_synced`] was called.
    pub async fn wait_synced(&self) {
        let mut rx = self.synced.subscribe();
        let _ = rx.wait_for(|s| *s).await;
    }

    /// The addresses of `pod`: the node's for `hostNetwork` pods, else its reserved one or
    /// the lowest free one.
    pub fn assign(&self, pod: &Pod) -> Result<Addresses, String> {
        let Some(cidr) = self.cidr else {
            return Ok(Addresses::loopback());
        };
        let host = self.node_ip();
        if pod
            .spec
            .as_ref()
            .and_then(|s| s.host_network)
            .unwrap_or(false)
        {
            return Ok(Addresses {
                pod: host.clone(),
                host,
            });
        }
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let mut taken = self.taken();
        let number = match taken.get(&uid) {
            Some(n) => *n,
            None => {
                let n = lowest_free(taken.values().copied())
                    .ok_or_else(|| format!("no free pod IP left in {cidr}"))?;
                taken.insert(uid, n);
                n
            }
        };
        Ok(Addresses {
            host,
            pod: cidr.host(number).to_string(),
        })
    }

    /// Gives the address of pod `uid` back.
    pub fn release(&self, uid: &str) {
        self.taken().remove(uid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{PodSpec, PodStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use pretty_assertions::assert_eq;

    #[test]
    fn parse_pod_cidr_takes_only_slash_24_networks() {
        let cases: &[(&str, Result<&str, &str>)] = &[
            ("127.1.3.0/24", Ok("127.1.3.0/24")),
            ("10.0.0.0/24", Ok("10.0.0.0/24")),
            (
                "127.1.3.0/16",
                Err(r#""127.1.3.0/16" is not a /24 network like 127.1.3.0/24"#),
            ),
            (
                "127.1.3.0",
                Err(r#""127.1.3.0" is not a /24 network like 127.1.3.0/24"#),
            ),
            (
                "127.1.300.0/24",
                Err(r#""127.1.300.0/24" is not a /24 network like 127.1.3.0/24"#),
            ),
            (
                "127.1.3.5/24",
                Err(r#""127.1.3.5/24" has host bits set; write 127.1.3.0/24"#),
            ),
        ];
        for (given, want) in cases {
            assert_eq!(
                parse_pod_cidr(given).map(|c| c.to_string()),
                want.map(str::to_owned).map_err(str::to_owned),
                "{given}"
            );
        }
    }

    #[test]
    fn lowest_free_starts_at_two_and_fills_gaps() {
        assert_eq!(lowest_free([]), Some(2));
        assert_eq!(lowest_free([2, 3, 5]), Some(4));
        assert_eq!(lowest_free(2..=254), None);
        assert_eq!(lowest_free(2..=253), Some(254));
    }

    fn pod(uid: &str, ip: Option<&str>, host_network: bool) -> Pod {
        Pod {
            metadata: ObjectMeta {
                uid: Some(uid.into()),
                ..Default::default()
            },
            spec: Some(PodSpec {
                host_network: host_network.then_some(true),
                ..Default::default()
            }),
            status: Some(PodStatus {
                pod_ip: ip.map(Into::into),
                ..Default::default()
            }),
        }
    }

    fn pod_ip(pool: &IpPool, p: &Pod) -> String {
        pool.assign(p).unwrap().pod
    }

    #[test]
    fn pool_assigns_lowest_free_reuses_reservations_and_releases() {
        let none = IpPool::new(None);
        assert_eq!(none.node_ip(), "127.0.0.1");
        assert_eq!(
            none.assign(&pod("a", None, false)),
            Ok(Addresses::loopback())
        );

        let pool = IpPool::new(Some(parse_pod_cidr("127.1.3.0/24").unwrap()));
        assert_eq!(pool.node_ip(), "127.1.3.1");
        // At restart: running pods keep what their status shows; foreign or clashing
        // addresses are not reserved.
        pool.reserve(&pod("old-b", Some("127.1.3.3"), false));
        pool.reserve(&pod("clash", Some("127.1.3.3"), false));
        pool.reserve(&pod("foreign", Some("10.0.0.7"), false));
        pool.reserve(&pod("node-ip", Some("127.1.3.1"), false));
        assert_eq!(
            pod_ip(&pool, &pod("old-b", Some("127.1.3.3"), false)),
            "127.1.3.3"
        );
        assert_eq!(pod_ip(&pool, &pod("new-1", None, false)), "127.1.3.2");
        assert_eq!(
            pod_ip(&pool, &pod("clash", Some("127.1.3.3"), false)),
            "127.1.3.4"
        );
        // Stable on repeat.
        assert_eq!(pod_ip(&pool, &pod("new-1", None, false)), "127.1.3.2");
        assert_eq!(
            pool.assign(&pod("agent", None, true)),
            Ok(Addresses {
                host: "127.1.3.1".into(),
                pod: "127.1.3.1".into()
            })
        );
        pool.release("new-1");
        assert_eq!(pod_ip(&pool, &pod("new-2", None, false)), "127.1.3.2");
        assert_eq!(
            pool.assign(&pod("x", None, false)).unwrap().host,
            "127.1.3.1"
        );
    }

    #[test]
    fn pool_reports_exhaustion() {
        let pool = IpPool::new(Some(parse_pod_cidr("127.1.4.0/24").unwrap()));
        for i in 0..253 {
            pool.assign(&pod(&format!("p{i}"), None, false)).unwrap();
        }
        assert_eq!(
            pool.assign(&pod("one-too-many", None, false)),
            Err("no free pod IP left in 127.1.4.0/24".to_owned())
        );
    }
}
