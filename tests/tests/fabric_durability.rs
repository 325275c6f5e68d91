//! The real `mesh fabric` killed with SIGKILL: nothing it acknowledged is lost, and a
//! subscriber resumes across the restart without missing a change.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use mesh_common::client::{Client, SubEvent, Subscription};
use mesh_tests::FabricProcess;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_no_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let fabric = FabricProcess::start(&dir.path().join("data"));
    let cfg = fabric.client_config();

    // Four writers, each setting budgets as fast as acknowledgements come back.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(String, u32, u64)>();
    let mut writers = Vec::new();
    for w in 0..4 {
        let cfg = cfg.clone();
        let tx = tx.clone();
        writers.push(tokio::spawn(async move {
            let mut c = Client::connect(&cfg).await.unwrap();
            for i in 0u32.. {
                let app = format!("app-{w}-{}", i % 50);
                let line =
                    format!("BUDGET.SET {app} max_instances={i} cpu_milli=1000 memory_mb=64");
                match c.call(&line).await {
                    Ok(r) => {
                        let rev = r.get("rev").unwrap().parse().unwrap();
                        tx.send((app, i, rev)).unwrap();
                    }
                    Err(_) => return, // the fabric died mid-command: that one was not acknowledged
                }
            }
        }));
    }
    drop(tx);
    // Let writes flow, then crash the fabric in the middle of them.
    let mut acked: BTreeMap<String, (u32, u64)> = BTreeMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_millis(700);
    while tokio::time::Instant::now() < deadline {
        if let Ok(Some((app, v, rev))) =
            tokio::time::timeout(Duration::from_millis(50), rx.recv()).await
        {
            acked.insert(app, (v, rev));
        }
    }
    let (line, http) = fabric.kill9();
    while let Some((app, v, rev)) = rx.recv().await {
        acked.insert(app, (v, rev));
    }
    for w in writers {
        w.await.unwrap();
    }
    assert!(
        acked.len() >= 20,
        "too few writes happened before the kill: {}",
        acked.len()
    );

    let fabric = FabricProcess::start_on(&dir.path().join("data"), line, http);
    let mut c = Client::connect(&fabric.client_config()).await.unwrap();
    let list = c.call("BUDGET.LIST").await.unwrap();
    let stored: BTreeMap<String, (u32, u64)> = list
        .items
        .iter()
        .map(|i| {
            let b = mesh_common::model::Budget::from_fields(i).unwrap();
            (b.app, (b.max_instances, b.rev))
        })
        .collect();
    for (app, (v, rev)) in &acked {
        let (sv, srev) = stored
            .get(app)
            .unwrap_or_else(|| panic!("acknowledged budget {app} lost"));
        // The last acknowledged value is there, or a later write that committed unacknowledged.
        assert!(
            srev >= rev,
            "{app}: stored rev {srev} older than acknowledged {rev}"
        );
        if srev == rev {
            assert_eq!(sv, v, "{app}: value of rev {rev} differs");
        }
    }
    let max_acked = acked.values().map(|(_, r)| *r).max().unwrap();
    let rev: u64 = list.get("rev").unwrap().parse().unwrap();
    assert!(rev >= max_acked, "revision went back: {rev} < {max_acked}");
}

async fn next(sub: &mut Subscription) -> SubEvent {
    tokio::time::timeout(Duration::from_secs(30), sub.next())
        .await
        .expect("no event in 30 s")
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_resumes_across_a_fabric_crash() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let fabric = FabricProcess::start(&data);
    let cfg = fabric.client_config();
    let mut admin = Client::connect(&cfg).await.unwrap();
    admin
        .call("BUDGET.SET before max_instances=1 cpu_milli=1 memory_mb=1")
        .await
        .unwrap();

    let mut sub = Subscription::new(cfg.clone(), "budgets", None);
    match next(&mut sub).await {
        SubEvent::Put(e) => assert_eq!(e.get("app"), Some("before")),
        other => panic!("{other:?}"),
    }
    assert_eq!(next(&mut sub).await, SubEvent::Sync { rev: 1 });

    let (line, http) = fabric.kill9();
    drop(admin);
    let fabric = FabricProcess::start_on(&data, line, http);
    let mut admin = Client::connect(&fabric.client_config()).await.unwrap();
    admin
        .call("BUDGET.SET during max_instances=1 cpu_milli=1 memory_mb=1")
        .await
        .unwrap();
    admin.call("BUDGET.DEL before").await.unwrap();

    // The subscriber reconnects by itself and gets exactly the two changes, no reset.
    match next(&mut sub).await {
        SubEvent::Put(e) => assert_eq!((e.get("app"), e.get("rev")), (Some("during"), Some("2"))),
        other => panic!("want the put of rev 2, got {other:?}"),
    }
    match next(&mut sub).await {
        SubEvent::Del(e) => assert_eq!((e.get("app"), e.get("rev")), (Some("before"), Some("3"))),
        other => panic!("want the delete of rev 3, got {other:?}"),
    }
    assert_eq!(next(&mut sub).await, SubEvent::Sync { rev: 3 });
}
