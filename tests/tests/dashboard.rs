//! The Grafana dashboard in ops/grafana queries only metrics that the agent and the edge export.
#![allow(clippy::unwrap_used)]

#[test]
fn every_dashboard_metric_is_exported() {
    let dash = include_str!("../../ops/grafana/mesh-dashboard.json");
    let sources = [
        include_str!("../../agent/src/metrics.rs"),
        include_str!("../../edge/src/metrics.rs"),
    ]
    .concat();
    let json: serde_json::Value = serde_json::from_str(dash).unwrap();
    let mut names = std::collections::BTreeSet::new();
    for panel in json["panels"].as_array().unwrap() {
        for t in panel["targets"].as_array().unwrap() {
            let expr = t["expr"].as_str().unwrap();
            for (i, _) in expr.match_indices("mesh_") {
                let name: String = expr[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                names.insert(name);
            }
        }
    }
    assert!(names.len() >= 10, "{names:?}");
    for n in &names {
        // histograms are exported as NAME_bucket/_sum/_count from a family NAME
        let family = n.trim_end_matches("_bucket");
        assert!(
            sources.contains(family),
            "the dashboard uses {n}, which nothing exports"
        );
    }
}
