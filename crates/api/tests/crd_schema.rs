//! The generated CRDs match upstream's schema where it matters to users and to the API server:
//! names, scope, subresources, property sets, types, defaults, enums, required lists, list-map
//! keys and the CEL rule.

use nvdra_api::crds;
use pretty_assertions::assert_eq;
use serde_json::{Value, json};

fn crd(name: &str) -> Value {
    let crd = crds()
        .into_iter()
        .find(|c| c.metadata.name.as_deref() == Some(name))
        .unwrap_or_else(|| panic!("no CRD {name}"));
    serde_json::to_value(crd).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn at<'a>(value: &'a Value, pointer: &str) -> &'a Value {
    value
        .pointer(pointer)
        .unwrap_or_else(|| panic!("missing {pointer}"))
}

/// Sorted property names of the schema at `pointer`.
fn properties(value: &Value, pointer: &str) -> Vec<String> {
    let mut names: Vec<String> = at(value, &format!("{pointer}/properties"))
        .as_object()
        .unwrap_or_else(|| panic!("{pointer}/properties is not an object"))
        .keys()
        .cloned()
        .collect();
    names.sort();
    names
}

fn sorted_strings(value: &Value) -> Vec<String> {
    let mut v: Vec<String> = value
        .as_array()
        .unwrap_or_else(|| panic!("{value} is not an array"))
        .iter()
        .map(|s| {
            s.as_str()
                .unwrap_or_else(|| panic!("{s} is not a string"))
                .to_owned()
        })
        .collect();
    v.sort();
    v
}

/// Every schema node declares a type (structural schema rule); objects declare properties or
/// additionalProperties.
fn assert_structural(schema: &Value, path: &str) {
    let object = schema
        .as_object()
        .unwrap_or_else(|| panic!("{path} is not an object"));
    assert!(object.contains_key("type"), "{path} has no type");
    if let Some(props) = object.get("properties") {
        assert_eq!(object["type"], "object", "{path}");
        let props = props
            .as_object()
            .unwrap_or_else(|| panic!("{path}.properties is not an object"));
        for (name, prop) in props {
            assert_structural(prop, &format!("{path}.{name}"));
        }
    }
    if let Some(items) = object.get("items") {
        assert_eq!(object["type"], "array", "{path}");
        assert_structural(items, &format!("{path}[]"));
    }
}

const CD_SCHEMA: &str = "/spec/versions/0/schema/openAPIV3Schema";

#[test]
fn compute_domain_identity() {
    let cd = crd("computedomains.resource.nvidia.com");
    assert_eq!(
        at(&cd, "/spec/names"),
        &json!({
            "kind": "ComputeDomain",
            "listKind": "ComputeDomainList",
            "plural": "computedomains",
            "singular": "computedomain"
        })
    );
    assert_eq!(at(&cd, "/spec/group"), "resource.nvidia.com");
    assert_eq!(at(&cd, "/spec/scope"), "Namespaced");
    let versions = at(&cd, "/spec/versions").as_array().unwrap();
    assert_eq!(versions.len(), 1);
    assert_eq!(at(&cd, "/spec/versions/0/name"), "v1beta1");
    assert_eq!(at(&cd, "/spec/versions/0/served"), true);
    assert_eq!(at(&cd, "/spec/versions/0/storage"), true);
    assert_eq!(
        at(&cd, "/spec/versions/0/subresources"),
        &json!({"status": {}})
    );
    assert!(
        cd.pointer("/spec/versions/0/additionalPrinterColumns")
            .is_none()
    );
    assert!(cd.pointer("/spec/names/shortNames").is_none());
    assert_structural(at(&cd, CD_SCHEMA), "ComputeDomain");
}

#[test]
fn compute_domain_spec_schema() {
    let cd = crd("computedomains.resource.nvidia.com");
    let spec = &format!("{CD_SCHEMA}/properties/spec");
    assert_eq!(properties(&cd, spec), ["channel", "numNodes"]);
    assert_eq!(
        sorted_strings(at(&cd, &format!("{spec}/required"))),
        ["channel"]
    );
    assert_eq!(
        at(&cd, &format!("{spec}/x-kubernetes-validations")),
        &json!([{"rule": "self == oldSelf", "message": "A computeDomain.spec is immutable"}])
    );

    let num_nodes = at(&cd, &format!("{spec}/properties/numNodes"));
    assert_eq!(num_nodes["type"], "integer");
    assert_eq!(num_nodes["default"], 0);
    assert_eq!(num_nodes["minimum"], 0.0);

    let channel = &format!("{spec}/properties/channel");
    assert_eq!(
        properties(&cd, channel),
        ["allocationMode", "resourceClaimTemplate"]
    );
    assert_eq!(
        sorted_strings(at(&cd, &format!("{channel}/required"))),
        ["resourceClaimTemplate"]
    );
    let mode = at(&cd, &format!("{channel}/properties/allocationMode"));
    assert_eq!(mode["type"], "string");
    assert_eq!(mode["enum"], json!(["All", "Single"]));
    assert_eq!(mode["default"], "Single");

    let rct = &format!("{channel}/properties/resourceClaimTemplate");
    assert_eq!(properties(&cd, rct), ["name"]);
    assert_eq!(
        sorted_strings(at(&cd, &format!("{rct}/required"))),
        ["name"]
    );
    assert_eq!(at(&cd, &format!("{rct}/properties/name/type")), "string");
}

#[test]
fn compute_domain_status_schema() {
    let cd = crd("computedomains.resource.nvidia.com");
    let status = &format!("{CD_SCHEMA}/properties/status");
    assert_eq!(properties(&cd, status), ["conditions", "nodes", "status"]);
    assert_eq!(
        sorted_strings(at(&cd, &format!("{status}/required"))),
        ["status"]
    );
    // nvdra only: the controller's conditions, one per type (server-side apply list-map).
    let conditions = &format!("{status}/properties/conditions");
    assert_eq!(at(&cd, &format!("{conditions}/type")), "array");
    assert_eq!(
        at(&cd, &format!("{conditions}/x-kubernetes-list-type")),
        "map"
    );
    assert_eq!(
        at(&cd, &format!("{conditions}/x-kubernetes-list-map-keys")),
        &json!(["type"])
    );
    let global = at(&cd, &format!("{status}/properties/status"));
    assert_eq!(global["type"], "string");
    assert_eq!(global["enum"], json!(["Ready", "NotReady"]));
    assert_eq!(global["default"], "NotReady");

    let nodes = &format!("{status}/properties/nodes");
    assert_eq!(at(&cd, &format!("{nodes}/type")), "array");
    assert_eq!(at(&cd, &format!("{nodes}/x-kubernetes-list-type")), "map");
    assert_eq!(
        at(&cd, &format!("{nodes}/x-kubernetes-list-map-keys")),
        &json!(["name"])
    );
    let item = &format!("{nodes}/items");
    assert_eq!(
        properties(&cd, item),
        ["cliqueID", "index", "ipAddress", "name", "status"]
    );
    assert_eq!(
        sorted_strings(at(&cd, &format!("{item}/required"))),
        ["cliqueID", "ipAddress", "name"]
    );
    for field in ["cliqueID", "ipAddress", "name"] {
        assert_eq!(
            at(&cd, &format!("{item}/properties/{field}/type")),
            "string"
        );
    }
    let index = at(&cd, &format!("{item}/properties/index"));
    assert_eq!(index["type"], "integer");
    assert!(
        index.get("default").is_none(),
        "upstream has no default: {index}"
    );
    let node_status = at(&cd, &format!("{item}/properties/status"));
    assert_eq!(node_status["enum"], json!(["Ready", "NotReady"]));
    assert_eq!(node_status["default"], "NotReady");
}

#[test]
fn compute_domain_clique_schema() {
    let clique = crd("computedomaincliques.resource.nvidia.com");
    assert_eq!(
        at(&clique, "/spec/names"),
        &json!({
            "kind": "ComputeDomainClique",
            "listKind": "ComputeDomainCliqueList",
            "plural": "computedomaincliques",
            "singular": "computedomainclique"
        })
    );
    assert_eq!(at(&clique, "/spec/group"), "resource.nvidia.com");
    assert_eq!(at(&clique, "/spec/scope"), "Namespaced");
    assert_eq!(at(&clique, "/spec/versions/0/name"), "v1beta1");
    assert!(
        clique.pointer("/spec/versions/0/subresources").is_none(),
        "cliques have no status subresource"
    );
    let schema = at(&clique, CD_SCHEMA);
    assert_structural(schema, "ComputeDomainClique");
    // No spec and no status: `daemons` is top level.
    assert_eq!(properties(&clique, CD_SCHEMA), ["daemons"]);
    assert!(schema.get("required").is_none());

    let daemons = &format!("{CD_SCHEMA}/properties/daemons");
    assert_eq!(at(&clique, &format!("{daemons}/type")), "array");
    assert_eq!(
        at(&clique, &format!("{daemons}/x-kubernetes-list-type")),
        "map"
    );
    assert_eq!(
        at(&clique, &format!("{daemons}/x-kubernetes-list-map-keys")),
        &json!(["nodeName"])
    );
    let item = &format!("{daemons}/items");
    assert_eq!(
        properties(&clique, item),
        ["cliqueID", "index", "ipAddress", "nodeName", "status"]
    );
    assert_eq!(
        sorted_strings(at(&clique, &format!("{item}/required"))),
        ["cliqueID", "ipAddress", "nodeName"]
    );
    let index = at(&clique, &format!("{item}/properties/index"));
    assert_eq!(index["type"], "integer");
    assert!(index.get("default").is_none());
    let status = at(&clique, &format!("{item}/properties/status"));
    assert_eq!(status["enum"], json!(["Ready", "NotReady"]));
    assert_eq!(status["default"], "NotReady");
}

#[test]
fn crd_files_use_upstream_names_and_header() {
    let files = nvdra_api::crd_files().unwrap();
    let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "resource.nvidia.com_computedomains.yaml",
            "resource.nvidia.com_computedomaincliques.yaml"
        ]
    );
    for (name, yaml) in &files {
        assert!(
            yaml.starts_with(nvdra_api::crd::GENERATED_HEADER),
            "{name} lacks the generated-file header"
        );
        assert!(yaml.contains("cargo xtask generate"), "{name}");
        // The YAML parses back to the same object.
        let parsed: Value = serde_saphyr::from_str(yaml).unwrap();
        let original = crds()
            .into_iter()
            .find(|c| nvdra_api::crd::crd_file_name(c) == *name)
            .unwrap();
        assert_eq!(parsed, serde_json::to_value(original).unwrap(), "{name}");
    }
}
