//! Per-domain Node labels: finding stale ones (pure) and removing them.
//!
//! The agent labels a Node `resource.nvidia.com/computeDomain.<uid>=true` when it prepares a
//! channel of domain `<uid>` there, which places the domain's daemon on the node. Labels are
//! node state that no ownerReference can clean up, so the controller removes them: for one
//! domain when its finalizer runs, and for every vanished domain in the orphan sweep. Upstream's
//! single-valued label `resource.nvidia.com/computeDomain=<uid>` is removed the same way, so a
//! cluster migrating from the Go driver loses its stale labels too.
//!
//! Invariants: only keys under the per-domain prefix (and the upstream key) are ever touched;
//! `resource.nvidia.com/computeDomain.cliqueID` shares the prefix and is never treated as a
//! domain label. Removal is a JSON merge patch setting the keys to `null`, which is idempotent
//! and leaves every other label alone.
//!
//! Failure modes: a failed list or patch is returned as an error; the caller retries (the
//! finalizer keeps the domain until every label is gone).

use std::collections::{BTreeMap, HashSet};

use k8s_openapi::api::core::v1::Node;
use kube::Api;
use kube::api::{ListParams, Patch, PatchParams};
use nvdra_api::ComputeDomain;
use nvdra_api::names::{field_managers, labels};
use serde_json::{Map, Value, json};

use crate::error::Error;

/// Label keys of `node_labels` belonging to domains for which `gone(uid)` holds.
pub fn stale_domain_labels(
    node_labels: &BTreeMap<String, String>,
    gone: impl Fn(&str) -> bool,
) -> Vec<String> {
    node_labels
        .iter()
        .filter(|(key, value)| {
            if key.as_str() == labels::COMPUTE_DOMAIN {
                return gone(value);
            }
            match key.strip_prefix(labels::COMPUTE_DOMAIN_NODE_PREFIX) {
                Some(uid) => {
                    key.as_str() != labels::COMPUTE_DOMAIN_CLIQUE_ID && !uid.is_empty() && gone(uid)
                }
                None => false,
            }
        })
        .map(|(key, _)| key.clone())
        .collect()
}

/// The merge patch removing `keys` from a Node's labels.
pub fn unlabel_patch(keys: &[String]) -> Value {
    let nulls: Map<String, Value> = keys.iter().map(|k| (k.clone(), Value::Null)).collect();
    json!({"metadata": {"labels": nulls}})
}

/// Removes domain `uid`'s labels from every Node; returns how many Nodes were patched.
pub async fn remove_domain_labels(client: &kube::Client, uid: &str) -> Result<usize, Error> {
    let api: Api<Node> = Api::all(client.clone());
    let mut patched = 0;
    // Two selectors: ours (one key per domain) and upstream's (one key, the UID as value).
    for selector in [
        labels::compute_domain_node_label(uid),
        format!("{}={uid}", labels::COMPUTE_DOMAIN),
    ] {
        let nodes = api
            .list_metadata(&ListParams::default().labels(&selector))
            .await
            .map_err(Error::ListNodes)?;
        for node in nodes.items {
            let keys = stale_domain_labels(
                node.metadata.labels.as_ref().unwrap_or(&BTreeMap::new()),
                |u| u == uid,
            );
            patched += usize::from(unlabel(&api, node.metadata.name.as_deref(), &keys).await?);
        }
    }
    Ok(patched)
}

/// Removes the labels of every domain that does not exist from every Node; returns how
/// many Nodes were patched. Which domains exist is listed from the API server after the
/// Nodes, not taken from the controller's cache: agents label Nodes for domains they
/// looked up themselves, possibly before this controller's watch has delivered them, and
/// a domain listed afterwards is known before any of its labels could have been read.
pub async fn sweep_labels(client: &kube::Client) -> Result<usize, Error> {
    let api: Api<Node> = Api::all(client.clone());
    let mut nodes = Vec::new();
    let mut params = ListParams::default().limit(500);
    loop {
        let page = api.list_metadata(&params).await.map_err(Error::ListNodes)?;
        nodes.extend(page.items);
        match page.metadata.continue_ {
            Some(token) if !token.is_empty() => params = params.continue_token(&token),
            _ => break,
        }
    }
    let live = existing_domains(client).await?;
    let mut patched = 0;
    for node in nodes {
        let keys = stale_domain_labels(
            node.metadata.labels.as_ref().unwrap_or(&BTreeMap::new()),
            |uid| !live.contains(uid),
        );
        patched += usize::from(unlabel(&api, node.metadata.name.as_deref(), &keys).await?);
    }
    Ok(patched)
}

/// UIDs of every ComputeDomain in the cluster, read from the API server.
async fn existing_domains(client: &kube::Client) -> Result<HashSet<String>, Error> {
    let api: Api<ComputeDomain> = Api::all(client.clone());
    let mut uids = HashSet::new();
    let mut params = ListParams::default().limit(500);
    loop {
        let page = api
            .list_metadata(&params)
            .await
            .map_err(Error::ListDomains)?;
        uids.extend(page.items.into_iter().filter_map(|d| d.metadata.uid));
        match page.metadata.continue_ {
            Some(token) if !token.is_empty() => params = params.continue_token(&token),
            _ => break,
        }
    }
    Ok(uids)
}

async fn unlabel(api: &Api<Node>, node: Option<&str>, keys: &[String]) -> Result<bool, Error> {
    let Some(node) = node else { return Ok(false) };
    if keys.is_empty() {
        return Ok(false);
    }
    let params = PatchParams {
        field_manager: Some(field_managers::CONTROLLER.to_owned()),
        ..PatchParams::default()
    };
    match api
        .patch(node, &params, &Patch::Merge(unlabel_patch(keys)))
        .await
    {
        Ok(_) => {
            tracing::info!(node, labels = ?keys, "removed ComputeDomain labels from node");
            Ok(true)
        }
        // A node deleted meanwhile carries no labels any more.
        Err(kube::Error::Api(status)) if status.is_not_found() => Ok(false),
        Err(source) => Err(Error::UnlabelNode {
            node: node.to_owned(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pretty_assertions::assert_eq;

    #[test]
    fn stale_labels_table() {
        let node = BTreeMap::from([
            (
                "resource.nvidia.com/computeDomain.a".to_owned(),
                "true".to_owned(),
            ),
            (
                "resource.nvidia.com/computeDomain.b".to_owned(),
                "true".to_owned(),
            ),
            (
                "resource.nvidia.com/computeDomain".to_owned(),
                "a".to_owned(),
            ),
            (
                "resource.nvidia.com/computeDomain.cliqueID".to_owned(),
                "x".to_owned(),
            ),
            (
                "resource.nvidia.com/computeDomain.".to_owned(),
                "true".to_owned(),
            ),
            ("kubernetes.io/hostname".to_owned(), "n1".to_owned()),
            ("nvidia.com/gpu.clique".to_owned(), "a".to_owned()),
        ]);
        let cases: Vec<(&str, &[&str], Vec<&str>)> = vec![
            ("nothing gone", &[], vec![]),
            (
                "a gone: ours and upstream's",
                &["a"],
                vec![
                    "resource.nvidia.com/computeDomain",
                    "resource.nvidia.com/computeDomain.a",
                ],
            ),
            (
                "b gone",
                &["b"],
                vec!["resource.nvidia.com/computeDomain.b"],
            ),
            ("cliqueID is never a domain", &["cliqueID", "x"], vec![]),
        ];
        for (name, gone, want) in cases {
            let got = stale_domain_labels(&node, |uid| gone.contains(&uid));
            assert_eq!(got, want, "{name}");
        }
    }

    #[test]
    fn patch_sets_nulls() {
        assert_eq!(
            unlabel_patch(&["a".into(), "b".into()]),
            json!({"metadata": {"labels": {"a": null, "b": null}}})
        );
    }
}
