//! Reconciling one ComputeDomain: finalizer, children, status.
//!
//! Expected flow of [`reconcile`]:
//! 1. A ComputeDomain that does not decode is logged, counted
//!    (`nvdra_controller_reconciles_total{result="invalid_object"}`) and skipped without
//!    requeue, so one malformed object never stalls the others; if it is being deleted and
//!    carries our finalizer, its clean-up still runs (it needs only the UID).
//! 2. [`phase`] decides from the metadata alone: add the finalizer, apply, clean up, or nothing.
//! 3. Apply: server-side apply (field manager `nvdra-controller`, forced) of the daemon claim
//!    template, the daemon DaemonSet and the workload claim template, each skipped when the
//!    last apply wrote the same content and the cached object has not changed since; then the
//!    status computed by [`crate::clique`] from the cached cliques and daemon pods, applied to
//!    the status subresource only when it differs; an Event on Ready/NotReady transitions.
//! 4. Clean-up: [`crate::cleanup::delete_children`]; the finalizer comes off once the
//!    driver-namespace children are gone, and the domain leaves the metrics.
//!
//! Guarantees: every step is idempotent, so a reconcile may be cut short at any point (lost
//! leadership, crash) and rerun. Failures produce a Warning Event `ReconcileFailed` on the
//! domain, count in `nvdra_controller_reconcile_errors_total{error=<operation>}`, and retry
//! with capped exponential backoff ([`error_policy`]).
//!
//! Triggers are the watches only (the domain and everything it owns or is fed by), so status
//! follows clique and pod changes as they happen with no periodic polling.

use std::sync::Arc;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::resource::v1::ResourceClaimTemplate;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::core::DeserializeGuard;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::ObjectRef;
use kube::{Api, Resource, ResourceExt as _};
use nvdra_api::ComputeDomain;
use nvdra_api::names::{api_group, field_managers, finalizers, kinds, reasons};
use serde_json::json;

use crate::cleanup::{self, Progress};
use crate::clique;
use crate::context::{Child, Context};
use crate::daemonset;
use crate::error::Error;
use crate::resourceclaimtemplate;

/// How long to wait before checking again that deleted children are gone.
const CLEANUP_POLL: std::time::Duration = std::time::Duration::from_secs(2);

/// What a reconcile has to do, decided from the metadata alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// New domain: add the finalizer, then apply.
    AddFinalizer,
    /// Live domain with the finalizer: apply.
    Apply,
    /// Deleted domain with the finalizer: clean up, then remove the finalizer.
    Cleanup,
    /// Deleted domain without our finalizer: nothing left to do.
    Nothing,
}

/// Decides the [`Phase`] of a domain.
pub fn phase(meta: &ObjectMeta) -> Phase {
    let has_finalizer = meta
        .finalizers
        .as_ref()
        .is_some_and(|f| f.iter().any(|f| f == finalizers::COMPUTE_DOMAIN));
    match (meta.deletion_timestamp.is_some(), has_finalizer) {
        (false, false) => Phase::AddFinalizer,
        (false, true) => Phase::Apply,
        (true, true) => Phase::Cleanup,
        (true, false) => Phase::Nothing,
    }
}

/// The merge patch setting the finalizer list to `finalizers`, guarded by `resource_version`
/// so a concurrent change to the list makes it fail with a conflict instead of losing an
/// entry.
pub fn finalizers_patch(
    finalizers: &[String],
    resource_version: Option<&str>,
) -> serde_json::Value {
    json!({"metadata": {"finalizers": finalizers, "resourceVersion": resource_version}})
}

/// Reconciles one ComputeDomain (see the module docs).
#[tracing::instrument(skip_all, fields(namespace = guard.meta().namespace, name = guard.meta().name, uid = guard.meta().uid))]
pub async fn reconcile(
    guard: Arc<DeserializeGuard<ComputeDomain>>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    let started = ctx.metrics.start_reconcile();
    let result = match &guard.0 {
        Ok(cd) => reconcile_domain(cd, &ctx).await,
        Err(invalid) => reconcile_invalid(invalid, &ctx).await,
    };
    // A skipped undecodable object is counted as `invalid_object` instead.
    let skipped_invalid = guard.0.is_err() && phase(guard.meta()) != Phase::Cleanup;
    if !skipped_invalid {
        ctx.metrics
            .finish_reconcile(started, result.as_ref().map(|_| ()));
    }
    if let Err(err) = &result {
        tracing::warn!(error = %err.chain(), "reconcile failed");
        if let Ok(cd) = &guard.0 {
            publish(
                &ctx,
                cd,
                EventType::Warning,
                reasons::RECONCILE_FAILED,
                err.chain(),
            )
            .await;
        }
    } else if let Some(uid) = guard.meta().uid.as_deref() {
        ctx.reset_backoff(uid);
    }
    result
}

/// Retry policy: capped exponential backoff per domain, reset by a success.
pub fn error_policy(
    guard: Arc<DeserializeGuard<ComputeDomain>>,
    _err: &Error,
    ctx: Arc<Context>,
) -> Action {
    let key = guard
        .meta()
        .uid
        .clone()
        .unwrap_or_else(|| ObjectRef::from_obj(guard.as_ref()).to_string());
    Action::requeue(ctx.next_backoff(&key))
}

async fn reconcile_invalid(
    invalid: &kube::core::error_boundary::InvalidObject,
    ctx: &Context,
) -> Result<Action, Error> {
    let meta = &invalid.metadata;
    if phase(meta) == Phase::Cleanup {
        let uid = uid_of(meta)?;
        return cleanup(ctx, meta, uid, None).await;
    }
    ctx.metrics.invalid_object();
    tracing::warn!(error = %invalid.error, reason = reasons::INVALID_OBJECT, "skipping a ComputeDomain that does not decode");
    Ok(Action::await_change())
}

async fn reconcile_domain(cd: &ComputeDomain, ctx: &Context) -> Result<Action, Error> {
    let uid = uid_of(&cd.metadata)?;
    match phase(&cd.metadata) {
        Phase::Nothing => Ok(Action::await_change()),
        Phase::Cleanup => {
            let workload = cd
                .metadata
                .namespace
                .as_deref()
                .map(|ns| (ns, cd.spec.channel.resource_claim_template.name.as_str()));
            cleanup(ctx, &cd.metadata, uid, workload).await
        }
        Phase::AddFinalizer => {
            let mut list = cd.finalizers().to_vec();
            list.push(finalizers::COMPUTE_DOMAIN.to_owned());
            patch_finalizers(ctx, &cd.metadata, &list)
                .await
                .map_err(Error::AddFinalizer)?;
            apply(cd, uid, ctx).await
        }
        Phase::Apply => apply(cd, uid, ctx).await,
    }
}

fn uid_of(meta: &ObjectMeta) -> Result<&str, Error> {
    meta.uid.as_deref().ok_or_else(|| Error::MissingUid {
        namespace: meta.namespace.clone().unwrap_or_default(),
        name: meta.name.clone().unwrap_or_default(),
    })
}

async fn cleanup(
    ctx: &Context,
    meta: &ObjectMeta,
    uid: &str,
    workload: Option<(&str, &str)>,
) -> Result<Action, Error> {
    match cleanup::delete_children(ctx, uid, workload).await? {
        Progress::Waiting => Ok(Action::requeue(CLEANUP_POLL)),
        Progress::Done => {
            let list: Vec<String> = meta
                .finalizers
                .iter()
                .flatten()
                .filter(|f| f.as_str() != finalizers::COMPUTE_DOMAIN)
                .cloned()
                .collect();
            match patch_finalizers(ctx, meta, &list).await {
                Ok(()) => {}
                // Already gone: someone else finished the job.
                Err(kube::Error::Api(status)) if status.is_not_found() => {}
                Err(err) => return Err(Error::RemoveFinalizer(err)),
            }
            ctx.metrics.forget_domain(uid);
            ctx.forget(uid);
            tracing::info!("ComputeDomain cleaned up, finalizer removed");
            Ok(Action::await_change())
        }
    }
}

async fn patch_finalizers(
    ctx: &Context,
    meta: &ObjectMeta,
    list: &[String],
) -> Result<(), kube::Error> {
    let api: Api<ComputeDomain> = Api::namespaced(
        ctx.client.clone(),
        meta.namespace.as_deref().unwrap_or_default(),
    );
    let patch = finalizers_patch(list, meta.resource_version.as_deref());
    api.patch(
        meta.name.as_deref().unwrap_or_default(),
        &PatchParams::default(),
        &Patch::Merge(patch),
    )
    .await?;
    Ok(())
}

async fn apply(cd: &ComputeDomain, uid: &str, ctx: &Context) -> Result<Action, Error> {
    let namespace = ctx.settings.namespace.clone();
    let params = PatchParams::apply(field_managers::CONTROLLER).force();

    let template = resourceclaimtemplate::daemon(uid, &namespace);
    let templates: Api<ResourceClaimTemplate> = Api::namespaced(ctx.client.clone(), &namespace);
    let live = live_version(&ctx.stores.daemon_templates, &template.metadata);
    if !ctx.already_applied(Child::DaemonTemplate, uid, &template, live.as_deref()) {
        let applied = templates
            .patch(&template.name_any(), &params, &Patch::Apply(&template))
            .await
            .map_err(Error::ApplyDaemonClaimTemplate)?;
        ctx.record_applied(
            Child::DaemonTemplate,
            uid,
            &template,
            applied.resource_version(),
        );
    }

    let daemonset = daemonset::desired(uid, &ctx.settings);
    let daemonsets: Api<DaemonSet> = Api::namespaced(ctx.client.clone(), &namespace);
    let live = live_version(&ctx.stores.daemonsets, &daemonset.metadata);
    if !ctx.already_applied(Child::DaemonSet, uid, &daemonset, live.as_deref()) {
        let applied = daemonsets
            .patch(&daemonset.name_any(), &params, &Patch::Apply(&daemonset))
            .await
            .map_err(Error::ApplyDaemonSet)?;
        ctx.record_applied(
            Child::DaemonSet,
            uid,
            &daemonset,
            applied.resource_version(),
        );
    }

    if let Some(workload) = resourceclaimtemplate::workload(cd) {
        let api: Api<ResourceClaimTemplate> = Api::namespaced(
            ctx.client.clone(),
            workload.metadata.namespace.as_deref().unwrap_or_default(),
        );
        let live = live_version(&ctx.stores.workload_templates, &workload.metadata);
        if !ctx.already_applied(Child::WorkloadTemplate, uid, &workload, live.as_deref()) {
            let applied = api
                .patch(&workload.name_any(), &params, &Patch::Apply(&workload))
                .await
                .map_err(Error::ApplyWorkloadClaimTemplate)?;
            ctx.record_applied(
                Child::WorkloadTemplate,
                uid,
                &workload,
                applied.resource_version(),
            );
        }
    }

    let (cliques, pods) = (ctx.stores.cliques_of(uid), ctx.stores.pods_of(uid));
    tracing::debug!(
        cliques = cliques.len(),
        pods = pods.len(),
        "computing status"
    );
    let rows = clique::node_rows(&cliques, &pods);
    let status = clique::desired_status(cd, rows, Time(Timestamp::now()));
    let previous = cd.status.as_ref().map(|s| s.status);
    if cd.status.as_ref() != Some(&status) {
        let api: Api<ComputeDomain> = Api::namespaced(
            ctx.client.clone(),
            cd.metadata.namespace.as_deref().unwrap_or_default(),
        );
        let body = json!({
            "apiVersion": api_group::API_VERSION,
            "kind": kinds::COMPUTE_DOMAIN,
            "status": status,
        });
        api.patch_status(&cd.name_any(), &params, &Patch::Apply(&body))
            .await
            .map_err(Error::ApplyStatus)?;
        tracing::debug!(
            status = status.status.as_str(),
            nodes = status.nodes.len(),
            "status updated"
        );
    }
    ctx.metrics.set_domain(uid, status.status);
    if let Some((type_, reason)) = clique::transition_event(previous, status.status) {
        let note = status
            .conditions
            .first()
            .map(|c| c.message.clone())
            .unwrap_or_default();
        tracing::info!(reason, %note, "ComputeDomain readiness changed");
        publish(ctx, cd, type_, reason, note).await;
    }
    Ok(Action::await_change())
}

/// The cached resourceVersion of the object `meta` names, if cached.
fn live_version<K>(store: &kube::runtime::reflector::Store<K>, meta: &ObjectMeta) -> Option<String>
where
    K: Resource<DynamicType = ()> + Clone,
{
    let key = ObjectRef::<K>::new(meta.name.as_deref().unwrap_or_default())
        .within(meta.namespace.as_deref().unwrap_or_default());
    store
        .get(&key)
        .and_then(|obj| obj.meta().resource_version.clone())
}

async fn publish(ctx: &Context, cd: &ComputeDomain, type_: EventType, reason: &str, note: String) {
    let event = Event {
        type_,
        reason: reason.to_owned(),
        note: Some(note),
        action: "Reconcile".to_owned(),
        secondary: None,
    };
    if let Err(err) = ctx.recorder.publish(&event, &cd.object_ref(&())).await {
        tracing::warn!(error = %err, reason, "could not record an Event");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pretty_assertions::assert_eq;

    #[test]
    fn phases() {
        let deleted = Some(Time(Timestamp::from_second(1).unwrap()));
        let ours = Some(vec![
            "other".to_owned(),
            finalizers::COMPUTE_DOMAIN.to_owned(),
        ]);
        let cases = [
            (None, None, Phase::AddFinalizer),
            (None, Some(vec!["other".to_owned()]), Phase::AddFinalizer),
            (None, ours.clone(), Phase::Apply),
            (deleted.clone(), ours.clone(), Phase::Cleanup),
            (
                deleted.clone(),
                Some(vec!["other".to_owned()]),
                Phase::Nothing,
            ),
            (deleted.clone(), None, Phase::Nothing),
        ];
        for (deletion_timestamp, finalizers, want) in cases {
            let meta = ObjectMeta {
                deletion_timestamp: deletion_timestamp.clone(),
                finalizers: finalizers.clone(),
                ..ObjectMeta::default()
            };
            assert_eq!(phase(&meta), want, "{deletion_timestamp:?} {finalizers:?}");
        }
    }

    #[test]
    fn finalizer_patch_is_guarded() {
        assert_eq!(
            finalizers_patch(&["a".into()], Some("42")),
            json!({"metadata": {"finalizers": ["a"], "resourceVersion": "42"}})
        );
        assert_eq!(
            finalizers_patch(&[], Some("43")),
            json!({"metadata": {"finalizers": [], "resourceVersion": "43"}})
        );
    }
}
