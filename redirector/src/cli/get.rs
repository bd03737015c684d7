//! `redirector get services|endpoints`, as kubectl prints them.

use std::time::SystemTime;

use anyhow::Context;
use clap::{Args, Subcommand};
use redirector::datapath::record::Snapshot;
use redirector::model::Endpoint;

use super::BpffsArg;
use super::views::{Scope, age, list_endpoints, services, sorted, table};

#[derive(Args)]
pub struct GetArgs {
    #[command(subcommand)]
    what: GetWhat,
}

#[derive(Subcommand)]
enum GetWhat {
    #[command(visible_alias = "svc")]
    Services(ListArgs),
    #[command(visible_alias = "ep")]
    Endpoints {
        /// Only this service.
        name: Option<String>,
        #[command(flatten)]
        list: ListArgs,
    },
}

/// Which namespaces, and how to print.
#[derive(Args, Clone)]
struct ListArgs {
    #[arg(short, long, default_value = "default")]
    namespace: String,
    /// All namespaces.
    #[arg(short = 'A', long)]
    all_namespaces: bool,
    /// Output format: table (default) or json.
    #[arg(short, long, default_value = "table", value_parser = ["table", "json"])]
    output: String,
    #[command(flatten)]
    pins: BpffsArg,
}

impl ListArgs {
    fn scope(&self) -> Scope {
        if self.all_namespaces {
            Scope::All
        } else {
            Scope::Namespace(self.namespace.clone())
        }
    }
}

pub fn run(args: GetArgs) -> anyhow::Result<()> {
    let (list, name) = match &args.what {
        GetWhat::Services(list) => (list, None),
        GetWhat::Endpoints { name, list } => (list, Some(name.as_deref())),
    };
    let snapshot = Snapshot::read(&list.pins.bpffs).context("redirector get")?;
    let scope = list.scope();
    let out = match (name, list.output.as_str()) {
        (name, "json") => format!("{:#}\n", services_json(&snapshot, &scope, name.flatten())),
        (None, _) => get_services(&snapshot, &scope, SystemTime::now()),
        (Some(name), _) => get_endpoints(&snapshot, &scope, name, SystemTime::now()),
    };
    print!("{out}");
    Ok(())
}

/// `redirector get services`, as `kubectl get services`.
pub fn get_services(snapshot: &Snapshot, scope: &Scope, now: SystemTime) -> String {
    let all = matches!(scope, Scope::All);
    let mut rows = Vec::new();
    for svc in services(snapshot, scope) {
        let ports: Vec<String> = svc
            .ports
            .iter()
            .map(|(p, _)| format!("{}/{}", p.frontend.port, p.frontend.protocol.as_k8s()))
            .collect();
        let mut row = Vec::new();
        if all {
            row.push(svc.namespace.to_owned());
        }
        row.extend([
            svc.name.to_owned(),
            svc.info.service_type.clone(),
            svc.cluster_ip.to_string(),
            "<none>".to_owned(),
            ports.join(","),
            age(svc.info.created.as_deref(), now),
        ]);
        rows.push(row);
    }
    let mut headers = vec!["NAME", "TYPE", "CLUSTER-IP", "EXTERNAL-IP", "PORT(S)", "AGE"];
    if all {
        headers.insert(0, "NAMESPACE");
    }
    table(&headers, &rows)
}

/// `redirector get endpoints [NAME]`, as `kubectl get endpoints`.
pub fn get_endpoints(snapshot: &Snapshot, scope: &Scope, name: Option<&str>, now: SystemTime) -> String {
    let all = matches!(scope, Scope::All);
    let mut rows = Vec::new();
    for svc in services(snapshot, scope) {
        if name.is_some_and(|n| n != svc.name) {
            continue;
        }
        let endpoints: Vec<Endpoint> = svc.ports.iter().flat_map(|(p, _)| sorted(&p.endpoints)).collect();
        let mut row = Vec::new();
        if all {
            row.push(svc.namespace.to_owned());
        }
        row.extend([
            svc.name.to_owned(),
            list_endpoints(&endpoints),
            age(svc.info.created.as_deref(), now),
        ]);
        rows.push(row);
    }
    let mut headers = vec!["NAME", "ENDPOINTS", "AGE"];
    if all {
        headers.insert(0, "NAMESPACE");
    }
    table(&headers, &rows)
}

/// `-o json` for `get services` and `get endpoints`: one object per Service
/// with its ports as programmed.
pub fn services_json(snapshot: &Snapshot, scope: &Scope, name: Option<&str>) -> serde_json::Value {
    let items: Vec<serde_json::Value> = services(snapshot, scope)
        .into_iter()
        .filter(|svc| name.is_none_or(|n| n == svc.name))
        .map(|svc| {
            let ports: Vec<serde_json::Value> = svc
                .ports
                .iter()
                .map(|(p, r)| {
                    serde_json::json!({
                        "name": r.port,
                        "port": p.frontend.port,
                        "protocol": p.frontend.protocol.as_k8s(),
                        "targetPort": r.info.target_port,
                        "endpoints": sorted(&p.endpoints).iter().map(Endpoint::to_string).collect::<Vec<_>>(),
                        "packets": p.stats.packets,
                        "bytes": p.stats.bytes,
                        "newFlows": p.stats.new_flows,
                        "drift": p.drift(),
                    })
                })
                .collect();
            serde_json::json!({
                "namespace": svc.namespace,
                "name": svc.name,
                "type": svc.info.service_type,
                "clusterIP": svc.cluster_ip.to_string(),
                "labels": svc.info.labels,
                "selector": svc.info.selector,
                "sessionAffinity": svc.info.session_affinity,
                "creationTimestamp": svc.info.created,
                "ports": ports,
            })
        })
        .collect();
    serde_json::json!({ "items": items })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::views::fixture::{now, snapshot};

    #[test]
    fn lists_like_kubectl() {
        let s = snapshot();
        let ns = Scope::Namespace("shop".into());
        assert_eq!(
            get_services(&s, &ns, now()),
            "NAME      TYPE        CLUSTER-IP   EXTERNAL-IP   PORT(S)          AGE\n\
             web-app   ClusterIP   10.96.0.10   <none>        80/TCP,443/TCP   5m30s\n",
            "get services"
        );
        assert_eq!(
            get_endpoints(&s, &ns, None, now()),
            "NAME      ENDPOINTS                                                     AGE\n\
             web-app   10.244.1.1:8080,10.244.1.2:8080,10.244.1.1:8443 + 4 more...   5m30s\n",
            "get endpoints: three, then the count of the rest"
        );
        assert!(
            get_services(&s, &Scope::Namespace("other".into()), now())
                .lines()
                .count()
                == 1,
            "other ns: header only"
        );
        assert!(
            get_services(&s, &Scope::All, now()).starts_with("NAMESPACE   NAME"),
            "-A adds NAMESPACE"
        );
    }
}
