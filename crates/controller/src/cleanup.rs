//! Removing what a ComputeDomain left behind: at its deletion (under its finalizer) and, for
//! domains that vanished without it, in the orphan sweep.
//!
//! Why a finalizer on the domain only, and none on children (upstream puts one on the claim
//! templates and the DaemonSet too): the workload claim template sits in the domain's
//! namespace with the domain as controller owner, so the garbage collector deletes it; the
//! daemon DaemonSet and daemon claim template sit in the driver namespace, where no
//! ownerReference to the domain is allowed, and the per-domain Node labels are node state.
//! Those three need the domain's finalizer. Finalizers on the children would only make them
//! linger (a child deleted by hand while its domain lives is recreated from the watch), and
//! they would wedge namespace deletion whenever the controller is down.
//!
//! Order at deletion ([`delete_children`]): workload template (so no new workload claims are
//! made from it) → DaemonSet → daemon template → Node labels; the finalizer comes off only
//! once the DaemonSet and the daemon template are confirmed gone. Every step treats NotFound
//! as done, so a retried clean-up is idempotent.
//!
//! The orphan sweep ([`sweep`]) runs at start, every `--orphan-sweep-interval`, and whenever a
//! watched child names a domain that is not in the cache. It deletes daemon DaemonSets and
//! daemon templates whose domain is gone and removes stale Node labels. It reads the children
//! before the set of live domains, so a child created for a domain that appeared meanwhile is
//! never mistaken for an orphan.

use std::collections::HashSet;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::resource::v1::ResourceClaimTemplate;
use kube::api::{DeleteParams, Preconditions};
use kube::{Api, ResourceExt as _};
use nvdra_api::names::objects;

use crate::context::{Context, domain_uid_label, has_domain_label};
use crate::error::Error;
use crate::node;

/// Where a domain's clean-up stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// Everything is gone: the finalizer may come off.
    Done,
    /// Deletions were requested but some children still exist.
    Waiting,
}

/// Names of children whose domain UID label is not in `live` (children without the label are
/// not ours and are never returned).
pub fn orphans<'a>(
    children: impl IntoIterator<Item = (&'a str, Option<&'a str>)>,
    live: &HashSet<String>,
) -> Vec<String> {
    children
        .into_iter()
        .filter(|(_, uid)| uid.is_some_and(|uid| !live.contains(uid)))
        .map(|(name, _)| name.to_owned())
        .collect()
}

/// Deletes domain `uid`'s children and Node labels; `workload` is the workload template's
/// namespace and name when the domain could be decoded.
pub async fn delete_children(
    ctx: &Context,
    uid: &str,
    workload: Option<(&str, &str)>,
) -> Result<Progress, Error> {
    if let Some((namespace, name)) = workload {
        delete_workload_template(ctx, uid, namespace, name).await?;
    }
    let name = objects::daemon_name(uid);
    let namespace = ctx.settings.namespace.as_str();
    let daemonsets: Api<DaemonSet> = Api::namespaced(ctx.client.clone(), namespace);
    let templates: Api<ResourceClaimTemplate> = Api::namespaced(ctx.client.clone(), namespace);
    let ds_gone = delete_if_present(&daemonsets, &name)
        .await
        .map_err(Error::DeleteDaemonSet)?;
    let rct_gone = delete_if_present(&templates, &name)
        .await
        .map_err(Error::DeleteDaemonClaimTemplate)?;
    let unlabelled = node::remove_domain_labels(&ctx.client, uid).await?;
    tracing::info!(
        uid,
        nodes_unlabelled = unlabelled,
        "cleaned up ComputeDomain children"
    );
    Ok(if ds_gone && rct_gone {
        Progress::Done
    } else {
        Progress::Waiting
    })
}

/// Deletes the workload template only if it is this domain's (the name is the user's choice
/// and might be taken by something else), with the UID as precondition.
async fn delete_workload_template(
    ctx: &Context,
    uid: &str,
    namespace: &str,
    name: &str,
) -> Result<(), Error> {
    let api: Api<ResourceClaimTemplate> = Api::namespaced(ctx.client.clone(), namespace);
    let existing = api
        .get_opt(name)
        .await
        .map_err(Error::DeleteWorkloadClaimTemplate)?;
    let Some(existing) = existing.filter(|t| has_domain_label(t, uid)) else {
        return Ok(());
    };
    let params = DeleteParams {
        preconditions: Some(Preconditions {
            uid: existing.uid(),
            resource_version: None,
        }),
        ..DeleteParams::default()
    };
    match api.delete(name, &params).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.is_not_found() || status.code == 409 => Ok(()),
        Err(err) => Err(Error::DeleteWorkloadClaimTemplate(err)),
    }
}

/// Deletes `name` (absent counts as deleted); `Ok(true)` when a read afterwards no longer
/// finds it. The read settles what the DELETE reply leaves open: depending on the kind and
/// propagation the server answers with the object or with a Status either way.
async fn delete_if_present<K>(api: &Api<K>, name: &str) -> Result<bool, kube::Error>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => {}
        Err(kube::Error::Api(status)) if status.is_not_found() => return Ok(true),
        Err(err) => return Err(err),
    }
    Ok(api.get_opt(name).await?.is_none())
}

/// What one orphan sweep removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SweepReport {
    /// Daemon DaemonSets deleted.
    pub daemonsets: usize,
    /// Daemon claim templates deleted.
    pub templates: usize,
    /// Nodes that lost stale labels.
    pub nodes: usize,
}

/// Deletes children and Node labels of domains that no longer exist. The caller must wait for
/// the stores to be ready first: an empty domain cache would make every child an orphan.
pub async fn sweep(ctx: &Context) -> Result<SweepReport, Error> {
    let daemonsets = ctx.stores.daemonsets.state();
    let templates = ctx.stores.daemon_templates.state();
    let live = ctx.stores.domain_uids();
    let namespace = ctx.settings.namespace.as_str();
    let mut report = SweepReport::default();

    let ds_api: Api<DaemonSet> = Api::namespaced(ctx.client.clone(), namespace);
    let stale = orphans(
        daemonsets.iter().map(|d| {
            (
                d.metadata.name.as_deref().unwrap_or_default(),
                domain_uid_label(d.as_ref()),
            )
        }),
        &live,
    );
    for name in stale {
        delete_if_present(&ds_api, &name)
            .await
            .map_err(Error::DeleteDaemonSet)?;
        tracing::info!(daemonset = %name, "deleted the DaemonSet of a vanished ComputeDomain");
        report.daemonsets += 1;
    }

    let rct_api: Api<ResourceClaimTemplate> = Api::namespaced(ctx.client.clone(), namespace);
    let stale = orphans(
        templates.iter().map(|t| {
            (
                t.metadata.name.as_deref().unwrap_or_default(),
                domain_uid_label(t.as_ref()),
            )
        }),
        &live,
    );
    for name in stale {
        delete_if_present(&rct_api, &name)
            .await
            .map_err(Error::DeleteDaemonClaimTemplate)?;
        tracing::info!(template = %name, "deleted the daemon claim template of a vanished ComputeDomain");
        report.templates += 1;
    }

    report.nodes = node::sweep_labels(&ctx.client).await?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use pretty_assertions::assert_eq;

    #[test]
    fn orphans_table() {
        let live: HashSet<String> = ["a".to_owned(), "b".to_owned()].into();
        type Case<'a> = (&'a str, Vec<(&'a str, Option<&'a str>)>, Vec<&'a str>);
        let cases: Vec<Case<'_>> = vec![
            ("nothing", vec![], vec![]),
            ("all live", vec![("x", Some("a")), ("y", Some("b"))], vec![]),
            (
                "one gone",
                vec![("x", Some("a")), ("y", Some("c"))],
                vec!["y"],
            ),
            ("unlabelled is not ours", vec![("z", None)], vec![]),
        ];
        for (name, children, want) in cases {
            assert_eq!(orphans(children, &live), want, "{name}");
        }
    }
}
