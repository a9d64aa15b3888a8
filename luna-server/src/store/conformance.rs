//! The store conformance suite: what every [`Store`] backend must do, as checks any backend's
//! tests run (`run_all` with a factory of fresh, empty stores), plus [`NxServer`], which starts
//! nx-27017 (a MongoDB wire-protocol server from PyPI) for tests of the MongoDB backend, as a
//! one-member replica set through `tests/assets/nx-replset.py` (the MongoDB store needs
//! transactions, which drivers use only on a replica set).
//!
//! Each check returns `Err(description)` instead of panicking, so one run reports every broken
//! invariant at once.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use luna_core::Kind;
use serde_json::{json, Value};

use super::{ensure_schema, Collection, Expect, Record, Store, StoreError, Write, SCHEMA_VERSION};

/// What a check found wrong.
pub type Outcome = Result<(), String>;
type BoxFut<T> = Pin<Box<dyn Future<Output = T> + Send>>;
/// A named check run against a fresh, empty store.
pub type Check = (&'static str, fn(Arc<dyn Store>) -> BoxFut<Outcome>);

macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(format!($($fmt)+));
        }
    };
}

const NODE: Collection = Collection::Object(Kind::Node);
const GROUP: Collection = Collection::Object(Kind::Group);

/// Every check of the suite.
pub fn checks() -> Vec<Check> {
    vec![
        ("create_get_list", |s| Box::pin(create_get_list(s))),
        ("revisions", |s| Box::pin(revisions(s))),
        ("compare_and_swap", |s| Box::pin(compare_and_swap(s))),
        ("failed_batch_changes_nothing", |s| Box::pin(failed_batch_changes_nothing(s))),
        ("read_checks", |s| Box::pin(read_checks(s))),
        ("concurrent_read_checks", |s| Box::pin(concurrent_read_checks(s))),
        ("doc_round_trip", |s| Box::pin(doc_round_trip(s))),
        ("concurrent_claims", |s| Box::pin(concurrent_claims(s))),
        ("concurrent_counter", |s| Box::pin(concurrent_counter(s))),
        ("big_batch", |s| Box::pin(big_batch(s))),
        ("schema", |s| Box::pin(schema(s))),
    ]
}

/// Runs every check, each on a store `fresh` makes; returns `check: problem` per failure.
pub async fn run_all<F, Fut>(fresh: F) -> Vec<String>
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<Arc<dyn Store>, String>>,
{
    let mut failures = Vec::new();
    for (name, check) in checks() {
        let started = Instant::now();
        let outcome = match fresh().await {
            Ok(store) => check(store).await,
            Err(e) => Err(format!("could not make a fresh store: {e}")),
        };
        println!("{name}: {} in {:?}", if outcome.is_ok() { "ok" } else { "FAILED" }, started.elapsed());
        if let Err(e) = outcome {
            failures.push(format!("{name}: {e}"));
        }
    }
    failures
}

pub fn put(collection: Collection, key: &str, expect: Expect, doc: Value) -> Write {
    Write::Put { collection, key: key.to_string(), expect, doc }
}

pub fn del(collection: Collection, key: &str, expect: Expect) -> Write {
    Write::Delete { collection, key: key.to_string(), expect }
}

pub fn check(collection: Collection, key: &str, expect: Expect) -> Write {
    Write::Check { collection, key: key.to_string(), expect }
}

async fn commit(store: &dyn Store, writes: Vec<Write>, what: &str) -> Outcome {
    store.commit(writes).await.map_err(|e| format!("{what}: commit failed: {e}"))
}

async fn get(store: &dyn Store, c: Collection, key: &str) -> Result<Option<Record>, String> {
    store.get(c, key).await.map_err(|e| format!("get {c} '{key}' failed: {e}"))
}

async fn list(store: &dyn Store, c: Collection, prefix: &str) -> Result<Vec<Record>, String> {
    store.list(c, prefix).await.map_err(|e| format!("list {c} '{prefix}' failed: {e}"))
}

/// The commit must fail with a conflict naming exactly this record and these states.
async fn expect_conflict(
    store: &dyn Store,
    writes: Vec<Write>,
    want: (Collection, &str, &str, &str),
    what: &str,
) -> Outcome {
    match store.commit(writes).await {
        Err(StoreError::Conflict { collection, key, expected, found }) => {
            let got = (collection, key.as_str(), expected.as_str(), found.as_str());
            ensure!(got == want, "{what}: conflict {got:?}, wanted {want:?}");
            Ok(())
        }
        Ok(()) => Err(format!("{what}: commit succeeded, wanted a conflict {want:?}")),
        Err(e) => Err(format!("{what}: wanted a conflict {want:?}, got error {e}")),
    }
}

async fn expect_record(store: &dyn Store, c: Collection, key: &str, rev: u64, doc: &Value, what: &str) -> Outcome {
    match get(store, c, key).await? {
        Some(r) => {
            ensure!(
                r.rev == rev && &r.doc == doc,
                "{what}: {c} '{key}' is rev {} {}, wanted rev {rev} {doc}",
                r.rev,
                r.doc
            );
            ensure!(r.collection == c && r.key == key, "{what}: record names {} '{}'", r.collection, r.key);
            Ok(())
        }
        None => Err(format!("{what}: {c} '{key}' is missing, wanted rev {rev}")),
    }
}

async fn expect_absent(store: &dyn Store, c: Collection, key: &str, what: &str) -> Outcome {
    match get(store, c, key).await? {
        None => Ok(()),
        Some(r) => Err(format!("{what}: {c} '{key}' exists (rev {}), wanted absent", r.rev)),
    }
}

fn keys(records: &[Record]) -> Vec<&str> {
    records.iter().map(|r| r.key.as_str()).collect()
}

pub async fn create_get_list(store: Arc<dyn Store>) -> Outcome {
    let s = store.as_ref();
    // Written out of order, with characters a regex or a dotted path would trip over.
    let names = ["b", "a.b", "a", "$x", "a/b", "aé", "a b", "B", "ab", "a\u{ffff}", "日本", "a-1", "mac/aa:bb", "ax"];
    let writes = names.iter().map(|k| put(NODE, k, Expect::Absent, json!({ "name": k }))).collect();
    commit(s, writes, "create").await?;
    // The same key in another collection is another record.
    commit(s, vec![put(GROUP, "a", Expect::Absent, json!("group a"))], "create group").await?;
    for k in names {
        expect_record(s, NODE, k, 1, &json!({ "name": k }), "get").await?;
    }
    expect_record(s, GROUP, "a", 1, &json!("group a"), "get group").await?;
    expect_absent(s, NODE, "missing", "get missing").await?;
    expect_absent(s, NODE, "A", "get differently cased").await?;
    ensure!(list(s, Collection::Claim, "").await?.is_empty(), "an untouched collection lists records");

    let mut sorted: Vec<&str> = names.to_vec();
    sorted.sort_unstable();
    let all = list(s, NODE, "").await?;
    ensure!(keys(&all) == sorted, "list all: {:?}, wanted {sorted:?}", keys(&all));
    ensure!(all.iter().all(|r| r.collection == NODE && r.rev == 1), "list all returned foreign or wrong records");
    let groups = list(s, GROUP, "").await?;
    ensure!(keys(&groups) == ["a"], "list groups: {:?}", keys(&groups));

    for prefix in ["a", "a.", "$", "a/", "mac/", "日", "z", "ab", "a\u{ffff}"] {
        let want: Vec<&str> = sorted.iter().copied().filter(|k| k.starts_with(prefix)).collect();
        let got = list(s, NODE, prefix).await?;
        ensure!(keys(&got) == want, "list prefix '{prefix}': {:?}, wanted {want:?}", keys(&got));
        for r in &got {
            ensure!(r.doc == json!({ "name": r.key }), "list prefix '{prefix}': '{}' has doc {}", r.key, r.doc);
        }
    }
    // An empty batch is a no-op.
    commit(s, vec![], "empty batch").await?;
    Ok(())
}

pub async fn revisions(store: Arc<dyn Store>) -> Outcome {
    let s = store.as_ref();
    commit(s, vec![put(NODE, "n1", Expect::Absent, json!(1))], "create").await?;
    expect_record(s, NODE, "n1", 1, &json!(1), "after create").await?;
    for rev in 1..5_u64 {
        commit(s, vec![put(NODE, "n1", Expect::Rev(rev), json!(rev + 1))], "update").await?;
        expect_record(s, NODE, "n1", rev + 1, &json!(rev + 1), "after update").await?;
    }
    commit(s, vec![del(NODE, "n1", Expect::Rev(5))], "delete").await?;
    expect_absent(s, NODE, "n1", "after delete").await?;
    ensure!(list(s, NODE, "").await?.is_empty(), "a deleted record is still listed");
    // A record created again starts over.
    commit(s, vec![put(NODE, "n1", Expect::Absent, json!("again"))], "re-create").await?;
    expect_record(s, NODE, "n1", 1, &json!("again"), "after re-create").await?;
    // Revisions are per record: a batch bumps each of its records by one.
    commit(s, vec![put(NODE, "n2", Expect::Absent, json!(0)), put(NODE, "n1", Expect::Rev(1), json!("b"))], "batch")
        .await?;
    expect_record(s, NODE, "n1", 2, &json!("b"), "batch").await?;
    expect_record(s, NODE, "n2", 1, &json!(0), "batch").await?;
    Ok(())
}

pub async fn compare_and_swap(store: Arc<dyn Store>) -> Outcome {
    let s = store.as_ref();
    commit(s, vec![put(NODE, "n", Expect::Absent, json!("v1"))], "create").await?;
    commit(s, vec![put(NODE, "n", Expect::Rev(1), json!("v2"))], "cas").await?;
    expect_conflict(s, vec![put(NODE, "n", Expect::Rev(1), json!("v3"))], (NODE, "n", "rev 1", "rev 2"), "stale rev")
        .await?;
    expect_conflict(s, vec![put(NODE, "n", Expect::Rev(7), json!("v3"))], (NODE, "n", "rev 7", "rev 2"), "future rev")
        .await?;
    expect_conflict(
        s,
        vec![put(NODE, "n", Expect::Absent, json!("v3"))],
        (NODE, "n", "absent", "rev 2"),
        "absent on existing",
    )
    .await?;
    expect_conflict(
        s,
        vec![put(NODE, "m", Expect::Rev(1), json!("v"))],
        (NODE, "m", "rev 1", "absent"),
        "rev on missing",
    )
    .await?;
    expect_conflict(s, vec![del(NODE, "n", Expect::Rev(1))], (NODE, "n", "rev 1", "rev 2"), "delete wrong rev").await?;
    expect_conflict(s, vec![del(NODE, "n", Expect::Absent)], (NODE, "n", "absent", "rev 2"), "delete expecting absent")
        .await?;
    expect_conflict(s, vec![del(NODE, "m", Expect::Rev(1))], (NODE, "m", "rev 1", "absent"), "delete missing").await?;
    expect_record(s, NODE, "n", 2, &json!("v2"), "after failed writes").await?;
    expect_absent(s, NODE, "m", "after failed writes").await?;
    commit(s, vec![del(NODE, "n", Expect::Rev(2))], "delete right rev").await?;
    expect_absent(s, NODE, "n", "after delete").await?;
    Ok(())
}

pub async fn failed_batch_changes_nothing(store: Arc<dyn Store>) -> Outcome {
    let s = store.as_ref();
    let setup = vec![
        put(NODE, "a", Expect::Absent, json!("a1")),
        put(NODE, "b", Expect::Absent, json!("b1")),
        put(NODE, "c", Expect::Absent, json!("c1")),
        put(Collection::Claim, "mac/aa", Expect::Absent, json!({ "kind": "node", "owner": "a" })),
    ];
    commit(s, setup, "setup").await?;
    commit(s, vec![put(NODE, "c", Expect::Rev(1), json!("c2"))], "bump c").await?;
    let check_untouched = |what: &'static str| async move {
        expect_record(s, NODE, "a", 1, &json!("a1"), what).await?;
        expect_record(s, NODE, "b", 1, &json!("b1"), what).await?;
        expect_record(s, NODE, "c", 2, &json!("c2"), what).await?;
        expect_record(s, Collection::Claim, "mac/aa", 1, &json!({ "kind": "node", "owner": "a" }), what).await?;
        expect_absent(s, NODE, "d", what).await?;
        expect_absent(s, NODE, "e", what).await?;
        expect_absent(s, Collection::Claim, "mac/bb", what).await?;
        let all = list(s, NODE, "").await?;
        ensure!(keys(&all) == ["a", "b", "c"], "{what}: nodes are {:?}", keys(&all));
        Ok::<(), String>(())
    };
    // Good writes before and after the bad one, in several collections, of every kind.
    let batch = vec![
        put(NODE, "a", Expect::Rev(1), json!("a2")),
        del(NODE, "b", Expect::Rev(1)),
        put(NODE, "d", Expect::Absent, json!("d1")),
        del(Collection::Claim, "mac/aa", Expect::Rev(1)),
        put(Collection::Claim, "mac/bb", Expect::Absent, json!({ "kind": "node", "owner": "d" })),
        put(NODE, "c", Expect::Rev(1), json!("c3")),
        put(NODE, "e", Expect::Absent, json!("e1")),
    ];
    expect_conflict(s, batch.clone(), (NODE, "c", "rev 1", "rev 2"), "stale write last but one").await?;
    check_untouched("after a stale rev").await?;
    // The first mismatch in batch order is the one reported.
    let mut two_bad = batch.clone();
    two_bad[1] = del(NODE, "b", Expect::Rev(9));
    expect_conflict(s, two_bad, (NODE, "b", "rev 9", "rev 1"), "two stale writes").await?;
    check_untouched("after two stale writes").await?;
    let taken = vec![
        put(NODE, "a", Expect::Rev(1), json!("a2")),
        put(NODE, "d", Expect::Absent, json!("d1")),
        put(Collection::Claim, "mac/aa", Expect::Absent, json!("taken")),
        put(NODE, "e", Expect::Absent, json!("e1")),
    ];
    expect_conflict(s, taken, (Collection::Claim, "mac/aa", "absent", "rev 1"), "claim taken").await?;
    check_untouched("after a taken claim").await?;
    // And the same batch with the stale write fixed applies whole.
    let mut fixed = batch;
    fixed[5] = put(NODE, "c", Expect::Rev(2), json!("c3"));
    commit(s, fixed, "fixed batch").await?;
    expect_record(s, NODE, "a", 2, &json!("a2"), "fixed batch").await?;
    expect_absent(s, NODE, "b", "fixed batch").await?;
    expect_record(s, NODE, "c", 3, &json!("c3"), "fixed batch").await?;
    expect_record(s, NODE, "d", 1, &json!("d1"), "fixed batch").await?;
    expect_record(s, NODE, "e", 1, &json!("e1"), "fixed batch").await?;
    expect_absent(s, Collection::Claim, "mac/aa", "fixed batch").await?;
    expect_record(s, Collection::Claim, "mac/bb", 1, &json!({ "kind": "node", "owner": "d" }), "fixed batch").await?;
    Ok(())
}

/// Read expectations: a batch applies only while what it read still holds, and a check writes
/// nothing (no new revision, no record created or removed).
pub async fn read_checks(store: Arc<dyn Store>) -> Outcome {
    let s = store.as_ref();
    commit(s, vec![put(GROUP, "g", Expect::Absent, json!("g1")), put(NODE, "n", Expect::Absent, json!("n1"))], "setup")
        .await?;
    // Checks that hold: the writes apply, the checked records keep their revision.
    commit(
        s,
        vec![
            check(GROUP, "g", Expect::Rev(1)),
            put(NODE, "n", Expect::Rev(1), json!("n2")),
            check(GROUP, "h", Expect::Absent),
        ],
        "holding checks",
    )
    .await?;
    expect_record(s, GROUP, "g", 1, &json!("g1"), "after holding checks").await?;
    expect_record(s, NODE, "n", 2, &json!("n2"), "after holding checks").await?;
    expect_absent(s, GROUP, "h", "a checked absent record").await?;
    // A batch of checks alone is a no-op that succeeds.
    commit(s, vec![check(GROUP, "g", Expect::Rev(1)), check(NODE, "n", Expect::Rev(2))], "checks only").await?;
    expect_record(s, GROUP, "g", 1, &json!("g1"), "after checks only").await?;
    // A check that fails stops the batch, wherever it stands in it, and names the record.
    expect_conflict(
        s,
        vec![put(NODE, "n", Expect::Rev(2), json!("n3")), check(GROUP, "g", Expect::Rev(7))],
        (GROUP, "g", "rev 7", "rev 1"),
        "stale check last",
    )
    .await?;
    expect_conflict(
        s,
        vec![check(GROUP, "g", Expect::Absent), put(NODE, "m", Expect::Absent, json!("m1"))],
        (GROUP, "g", "absent", "rev 1"),
        "absent check on an existing record",
    )
    .await?;
    expect_conflict(
        s,
        vec![put(NODE, "m", Expect::Absent, json!("m1")), check(GROUP, "h", Expect::Rev(1))],
        (GROUP, "h", "rev 1", "absent"),
        "rev check on a missing record",
    )
    .await?;
    expect_record(s, NODE, "n", 2, &json!("n2"), "after failed checks").await?;
    expect_absent(s, NODE, "m", "after failed checks").await?;
    // The record changes after it was read: the check of the old revision fails.
    commit(s, vec![put(GROUP, "g", Expect::Rev(1), json!("g2"))], "change g").await?;
    expect_conflict(
        s,
        vec![check(GROUP, "g", Expect::Rev(1)), put(NODE, "n", Expect::Rev(2), json!("n3"))],
        (GROUP, "g", "rev 1", "rev 2"),
        "check of a changed record",
    )
    .await?;
    commit(s, vec![del(GROUP, "g", Expect::Rev(2))], "delete g").await?;
    expect_conflict(
        s,
        vec![check(GROUP, "g", Expect::Rev(2)), put(NODE, "n", Expect::Rev(2), json!("n3"))],
        (GROUP, "g", "rev 2", "absent"),
        "check of a deleted record",
    )
    .await?;
    expect_record(s, NODE, "n", 2, &json!("n2"), "after stale checks").await?;
    ensure!(list(s, GROUP, "").await?.is_empty(), "a failed check left a group behind");
    Ok(())
}

/// Two kinds of batches race: one deletes `g` if nothing refers to it, the other creates a
/// referrer of `g` with a check on it and bumps `g`'s referrer count. Whatever the order, a
/// referrer never outlives `g` (what the service's referrer records rely on).
pub async fn concurrent_read_checks(store: Arc<dyn Store>) -> Outcome {
    const ROUNDS: usize = 30;
    let counter = "users/g";
    for round in 0..ROUNDS {
        let s = store.as_ref();
        commit(s, vec![put(GROUP, "g", Expect::Absent, json!(round))], "create g").await?;
        let users = get(s, Collection::Meta, counter).await?.map(|r| r.rev);
        let users_expect = users.map_or(Expect::Absent, Expect::Rev);
        let node = format!("n{round}");
        let adder = {
            let store = store.clone();
            let node = node.clone();
            tokio::spawn(async move {
                let s = store.as_ref();
                let g = s.get(GROUP, "g").await.map_err(|e| e.to_string())?;
                let Some(g) = g else { return Ok::<bool, String>(false) };
                let users = s.get(Collection::Meta, counter).await.map_err(|e| e.to_string())?;
                let bump =
                    put(Collection::Meta, counter, users.map_or(Expect::Absent, |u| Expect::Rev(u.rev)), json!(1));
                let batch =
                    vec![check(GROUP, "g", Expect::Rev(g.rev)), put(NODE, &node, Expect::Absent, json!("g")), bump];
                match s.commit(batch).await {
                    Ok(()) => Ok(true),
                    Err(StoreError::Conflict { .. }) => Ok(false),
                    Err(e) => Err(format!("adder: {e}")),
                }
            })
        };
        let deleter = {
            let store = store.clone();
            tokio::spawn(async move {
                let s = store.as_ref();
                let batch = vec![check(Collection::Meta, counter, users_expect), del(GROUP, "g", Expect::Rev(1))];
                match s.commit(batch).await {
                    Ok(()) => Ok::<bool, String>(true),
                    Err(StoreError::Conflict { .. }) => Ok(false),
                    Err(e) => Err(format!("deleter: {e}")),
                }
            })
        };
        let added = adder.await.map_err(|e| format!("adder task: {e}"))??;
        let deleted = deleter.await.map_err(|e| format!("deleter task: {e}"))??;
        ensure!(!(added && deleted), "round {round}: node {node} was added to group g and g was deleted");
        let g = get(s, GROUP, "g").await?;
        let n = get(s, NODE, &node).await?;
        ensure!(g.is_none() == deleted, "round {round}: group present {} after delete {deleted}", g.is_some());
        ensure!(n.is_some() == added, "round {round}: node present {} after add {added}", n.is_some());
        if let Some(n) = n {
            commit(s, vec![del(NODE, &node, Expect::Rev(n.rev))], "clean node").await?;
        }
        if let Some(g) = g {
            commit(s, vec![del(GROUP, "g", Expect::Rev(g.rev))], "clean group").await?;
        }
    }
    Ok(())
}

/// Documents that break naive JSON↔BSON mappings.
pub fn nasty_docs() -> Vec<Value> {
    let mut deep = json!("bottom");
    for i in 0..60 {
        deep = if i % 2 == 0 { json!([deep]) } else { json!({ "d": deep }) };
    }
    vec![
        Value::Null,
        json!(true),
        json!(false),
        json!(0),
        json!(-1),
        json!(i64::MIN),
        json!(i64::MAX),
        json!(u64::MAX),
        json!(9_007_199_254_740_993_i64),
        json!(1.5),
        json!(0.1),
        json!(-0.0),
        json!(1e300),
        json!(5e-324),
        json!(f64::MAX),
        json!(-2.5e-10),
        json!(""),
        json!("żółć 🚀 \u{0} \" \\ \n\t \u{7f} \u{ffff}"),
        json!([]),
        json!({}),
        json!({ "": "" }),
        json!({
            "a.b": 1,
            "$set": { "$inc": 2, "x.y.z": [1, 2] },
            "": "empty key",
            ".": [".", "$", "$$"],
            "_id": "not the record key",
            "rev": "not the record rev",
            "doc": { "doc": null },
            "ключ": "значение",
            "nul\u{0}key": 1,
            "nested": { "int": 1, "float": 1.0, "neg": -9_223_372_036_854_775_807_i64, "big": 18_446_744_073_709_551_615_u64 },
        }),
        json!([1, "two", [3.5, { "four": [null, {}] }], { "": [] }, -0.5, u64::MAX]),
        deep,
        json!({ "blob": "x".repeat(1 << 20), "tail": "after a megabyte" }),
    ]
}

pub async fn doc_round_trip(store: Arc<dyn Store>) -> Outcome {
    let s = store.as_ref();
    let docs = nasty_docs();
    let key = |i: usize| format!("doc{i:03}");
    let writes = docs.iter().enumerate().map(|(i, d)| put(NODE, &key(i), Expect::Absent, d.clone())).collect();
    commit(s, writes, "store nasty docs").await?;
    // Equal as values and as text (so 1 vs 1.0 or a float's digits cannot drift).
    let text = |v: &Value| serde_json::to_string(v).unwrap_or_default();
    let same = |got: &Value, want: &Value| got == want && text(got) == text(want);
    for (i, want) in docs.iter().enumerate() {
        let got = get(s, NODE, &key(i)).await?.ok_or_else(|| format!("{} missing", key(i)))?;
        ensure!(
            same(&got.doc, want),
            "{} came back as {:.200}, wanted {:.200}",
            key(i),
            got.doc.to_string(),
            want.to_string()
        );
    }
    let listed = list(s, NODE, "doc").await?;
    ensure!(listed.len() == docs.len(), "listed {} docs, wanted {}", listed.len(), docs.len());
    for (r, want) in listed.iter().zip(&docs) {
        ensure!(same(&r.doc, want), "listed {} differs: {:.200}", r.key, r.doc.to_string());
    }
    // Updates round-trip too (a different code path in some backends).
    let writes = docs.iter().rev().enumerate().map(|(i, d)| put(NODE, &key(i), Expect::Rev(1), d.clone())).collect();
    commit(s, writes, "update nasty docs").await?;
    for (i, want) in docs.iter().rev().enumerate() {
        expect_record(s, NODE, &key(i), 2, want, "after update").await?;
    }
    Ok(())
}

pub async fn concurrent_claims(store: Arc<dyn Store>) -> Outcome {
    let mut tasks = Vec::new();
    for i in 0..16 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let claim =
                put(Collection::Claim, "mac/00:11:22:33:44:55", Expect::Absent, json!({ "kind": "node", "owner": i }));
            let node = put(NODE, &format!("n{i:02}"), Expect::Absent, json!({ "mac": "00:11:22:33:44:55" }));
            (i, store.commit(vec![node, claim]).await)
        }));
    }
    let mut winners = Vec::new();
    for t in tasks {
        let (i, r) = t.await.map_err(|e| format!("task failed: {e}"))?;
        match r {
            Ok(()) => winners.push(i),
            Err(StoreError::Conflict { ref key, .. }) if key == "mac/00:11:22:33:44:55" => {}
            Err(e) => return Err(format!("claimant {i}: unexpected error {e}")),
        }
    }
    ensure!(winners.len() == 1, "winners: {winners:?}, wanted exactly one");
    let winner = winners[0];
    expect_record(
        store.as_ref(),
        Collection::Claim,
        "mac/00:11:22:33:44:55",
        1,
        &json!({ "kind": "node", "owner": winner }),
        "claim",
    )
    .await?;
    let nodes = list(store.as_ref(), NODE, "").await?;
    ensure!(keys(&nodes) == [format!("n{winner:02}")], "losers' nodes were written: {:?}", keys(&nodes));
    Ok(())
}

pub async fn concurrent_counter(store: Arc<dyn Store>) -> Outcome {
    const TASKS: u64 = 16;
    const ROUNDS: u64 = 20;
    commit(store.as_ref(), vec![put(Collection::Meta, "counter", Expect::Absent, json!(0))], "seed").await?;
    let mut tasks = Vec::new();
    for _ in 0..TASKS {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..ROUNDS {
                loop {
                    let cur = get(store.as_ref(), Collection::Meta, "counter").await?.ok_or("counter vanished")?;
                    let n = cur.doc.as_u64().ok_or_else(|| format!("counter is {}", cur.doc))?;
                    match store.commit(vec![put(Collection::Meta, "counter", Expect::Rev(cur.rev), json!(n + 1))]).await
                    {
                        Ok(()) => break,
                        Err(StoreError::Conflict { .. }) => tokio::task::yield_now().await,
                        Err(e) => return Err(format!("increment failed: {e}")),
                    }
                }
            }
            Ok::<(), String>(())
        }));
    }
    for t in tasks {
        t.await.map_err(|e| format!("task failed: {e}"))??;
    }
    let n = TASKS * ROUNDS;
    expect_record(store.as_ref(), Collection::Meta, "counter", n + 1, &json!(n), "final counter").await
}

/// About what adding a 4096-node rack range writes: nodes plus a MAC and an IP claim each.
pub async fn big_batch(store: Arc<dyn Store>) -> Outcome {
    const NODES: usize = 4096;
    let s = store.as_ref();
    let node = |i: usize, gen: u32| {
        json!({ "name": format!("node{i:04}"), "group": "compute", "gen": gen,
                "interfaces": [{ "name": "eth0", "mac": format!("02:00:00:00:{:02x}:{:02x}", i / 256, i % 256),
                                 "ip": format!("10.1.{}.{}", i / 256, i % 256) }] })
    };
    let mut writes = Vec::with_capacity(3 * NODES);
    for i in 0..NODES {
        writes.push(put(NODE, &format!("node{i:04}"), Expect::Absent, node(i, 1)));
        let owner = json!({ "kind": "node", "owner": format!("node{i:04}") });
        writes.push(put(
            Collection::Claim,
            &format!("mac/02:00:00:00:{:02x}:{:02x}", i / 256, i % 256),
            Expect::Absent,
            owner.clone(),
        ));
        writes.push(put(Collection::Claim, &format!("ip/cluster/10.1.{}.{}", i / 256, i % 256), Expect::Absent, owner));
    }
    let started = Instant::now();
    commit(s, writes, "create 4096 nodes").await?;
    let created_in = started.elapsed();
    let nodes = list(s, NODE, "").await?;
    ensure!(nodes.len() == NODES, "listed {} nodes", nodes.len());
    for (i, r) in nodes.iter().enumerate() {
        ensure!(
            r.key == format!("node{i:04}") && r.rev == 1 && r.doc == node(i, 1),
            "node {i} listed as {} rev {}",
            r.key,
            r.rev
        );
    }
    ensure!(list(s, Collection::Claim, "mac/").await?.len() == NODES, "mac claims missing");
    ensure!(list(s, Collection::Claim, "ip/").await?.len() == NODES, "ip claims missing");

    // Update every node and drop every IP claim in one batch whose last write is stale: nothing.
    let mut writes = Vec::with_capacity(2 * NODES + 1);
    for i in 0..NODES {
        writes.push(put(NODE, &format!("node{i:04}"), Expect::Rev(1), node(i, 2)));
        writes.push(del(Collection::Claim, &format!("ip/cluster/10.1.{}.{}", i / 256, i % 256), Expect::Rev(1)));
    }
    writes.push(put(Collection::Claim, "mac/02:00:00:00:00:00", Expect::Absent, json!("dup")));
    expect_conflict(
        s,
        writes.clone(),
        (Collection::Claim, "mac/02:00:00:00:00:00", "absent", "rev 1"),
        "big stale batch",
    )
    .await?;
    let nodes = list(s, NODE, "").await?;
    ensure!(nodes.iter().all(|r| r.rev == 1 && r.doc["gen"] == 1), "a failed big batch changed nodes");
    ensure!(list(s, Collection::Claim, "ip/").await?.len() == NODES, "a failed big batch deleted claims");

    writes.pop();
    let started = Instant::now();
    commit(s, writes, "update 4096 nodes").await?;
    let updated_in = started.elapsed();
    let nodes = list(s, NODE, "").await?;
    ensure!(nodes.len() == NODES, "listed {} nodes after update", nodes.len());
    ensure!(nodes.iter().enumerate().all(|(i, r)| r.rev == 2 && r.doc == node(i, 2)), "update incomplete");
    ensure!(list(s, Collection::Claim, "ip/").await?.is_empty(), "ip claims not deleted");
    ensure!(list(s, Collection::Claim, "").await?.len() == NODES, "mac claims lost");
    println!("big_batch: 12288 creates in {created_in:?}, 8192 updates/deletes in {updated_in:?}");
    Ok(())
}

pub async fn schema(store: Arc<dyn Store>) -> Outcome {
    let s = store.as_ref();
    ensure_schema(s).await.map_err(|e| format!("fresh store: {e}"))?;
    expect_record(s, Collection::Meta, "schema", 1, &json!({ "version": SCHEMA_VERSION }), "fresh store").await?;
    ensure_schema(s).await.map_err(|e| format!("second ensure_schema: {e}"))?;
    expect_record(s, Collection::Meta, "schema", 1, &json!({ "version": SCHEMA_VERSION }), "second ensure_schema")
        .await?;

    commit(s, vec![put(Collection::Meta, "schema", Expect::Rev(1), json!({ "version": 999 }))], "set 999").await?;
    match ensure_schema(s).await {
        Err(StoreError::SchemaTooNew { found: 999, supported: SCHEMA_VERSION }) => {}
        other => return Err(format!("version 999: {other:?}, wanted SchemaTooNew")),
    }
    let bad_schemas = [json!({ "version": 0 }), json!({}), json!({ "version": "1" }), json!("garbage")];
    for (rev, bad) in (2..).zip(bad_schemas) {
        commit(s, vec![put(Collection::Meta, "schema", Expect::Rev(rev), bad.clone())], "set bad schema").await?;
        match ensure_schema(s).await {
            Err(StoreError::SchemaUnknown(_)) => {}
            other => return Err(format!("schema {bad}: {other:?}, wanted SchemaUnknown")),
        }
    }
    Ok(())
}

/// Through [`super::open`]: a fresh URL gets schema 1, a too-new one is refused on open.
pub async fn open_by_url(url: &str) -> Outcome {
    let store = super::open(url).await.map_err(|e| format!("open {url}: {e}"))?;
    expect_record(store.as_ref(), Collection::Meta, "schema", 1, &json!({ "version": SCHEMA_VERSION }), "opened store")
        .await?;
    commit(store.as_ref(), vec![put(Collection::Meta, "schema", Expect::Rev(1), json!({ "version": 999 }))], "set 999")
        .await?;
    drop(store);
    match super::open(url).await {
        Err(StoreError::SchemaTooNew { found: 999, .. }) => Ok(()),
        Err(e) => Err(format!("reopen with schema 999: {e}, wanted SchemaTooNew")),
        Ok(_) => Err("reopen with schema 999 succeeded, wanted SchemaTooNew".into()),
    }
}

/// The nx-27017 binary if the MongoDB tests are on (`LUNA_TEST_MONGO=1`); `None` (after saying
/// so) when off. Panics when they are on but the binary is missing: a silently skipped backend
/// would look green.
pub fn mongo_gate() -> Option<PathBuf> {
    if !luna_core::test_support::gate("LUNA_TEST_MONGO") {
        return None;
    }
    let bin = PathBuf::from(std::env::var("LUNA_NX27017").unwrap_or_else(|_| "/opt/luna-venv/bin/nx-27017".into()));
    assert!(
        bin.is_file(),
        "LUNA_TEST_MONGO=1 but nx-27017 is not at {} (python3 -m venv /opt/luna-venv && /opt/luna-venv/bin/pip install nx-27017, or set LUNA_NX27017)",
        bin.display()
    );
    Some(bin)
}

/// The replica set name [`NxServer`] announces.
pub const NX_SET_NAME: &str = "rs0";

/// The launcher that makes nx-27017 a one-member replica set with isolated transactions.
pub fn nx_replset_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/assets/nx-replset.py")
}

/// The command that runs nx-27017 as the one-member replica set [`NX_SET_NAME`] (in memory,
/// listening on `host:port`, its logs, pid and transaction-owner files in `dir`): the program
/// (the venv's interpreter next to `bin`) and its arguments. [`NxServer`] runs it on the
/// loopback; the VM fixture (`luna_tests::Cluster::start_pair`) inside a network namespace.
pub fn nx_replset_command(bin: &Path, host: &str, port: u16, dir: &Path) -> (PathBuf, Vec<std::ffi::OsString>) {
    // The venv's interpreter, which has nx-27017's modules.
    let python = bin.with_file_name("python3");
    let mut args: Vec<std::ffi::OsString> = vec![nx_replset_script().into()];
    for a in ["--set-name", NX_SET_NAME, "--transaction-lifetime", "10", "--owner-file"] {
        args.push(a.into());
    }
    args.push(dir.join("owner").into());
    for a in ["--db", "memory", "--host", host, "-p", &port.to_string(), "--log-file"] {
        args.push(a.into());
    }
    args.push(dir.join("nx.log").into());
    args.push("--pid-file".into());
    args.push(dir.join("nx.pid").into());
    (python, args)
}

/// An in-memory nx-27017 on a free loopback port, announcing the one-member replica set
/// [`NX_SET_NAME`], killed on drop.
pub struct NxServer {
    child: std::process::Child,
    port: u16,
    dir: PathBuf,
}

impl NxServer {
    pub async fn start(bin: &Path) -> std::io::Result<NxServer> {
        let mut last_err = None;
        // A port found free can be taken before nx binds it: try a few.
        for _ in 0..3 {
            match Self::try_start(bin).await {
                Ok(s) => return Ok(s),
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or_else(|| std::io::Error::other("nx-27017 did not start")))
    }

    async fn try_start(bin: &Path) -> std::io::Result<NxServer> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let dir = std::env::temp_dir().join(format!("luna-nx27017-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let log = std::fs::File::create(dir.join("out.log"))?;
        let (python, args) = nx_replset_command(bin, "127.0.0.1", port, &dir);
        let child = std::process::Command::new(&python)
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|e| std::io::Error::new(e.kind(), format!("cannot run {}: {e}", python.display())))?;
        let mut server = NxServer { child, port, dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                return Ok(server);
            }
            if let Some(status) = server.child.try_wait()? {
                let out = std::fs::read_to_string(server.dir.join("out.log")).unwrap_or_default();
                return Err(std::io::Error::other(format!("nx-27017 exited ({status}): {out}")));
            }
            if Instant::now() > deadline {
                return Err(std::io::Error::other(format!("nx-27017 did not listen on {port} within 30 s")));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Whether a transaction is open right now (the launcher's `--owner-file`).
    pub fn transaction_open(&self) -> bool {
        std::fs::read_to_string(self.dir.join("owner")).is_ok_and(|s| !s.trim().is_empty())
    }

    /// What the server (and its replica-set launcher) printed so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("out.log")).unwrap_or_default()
    }

    /// `mongodb://127.0.0.1:<port>/<db>?replicaSet=rs0&maxPoolSize=100`. The pool is larger
    /// than the driver's default (10) because the launcher serializes transactions by making
    /// other commands wait: with more waiting commands than connections, the open
    /// transaction's own next command would find no free connection (MongoDB itself never
    /// makes commands wait like that).
    pub fn url(&self, db: &str) -> String {
        format!("mongodb://127.0.0.1:{}/{db}?replicaSet={NX_SET_NAME}&maxPoolSize=100", self.port)
    }
}

impl Drop for NxServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `uri` with its database path replaced by `db` (options kept).
pub fn with_database(uri: &str, db: &str) -> String {
    let (base, query) = match uri.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (uri, None),
    };
    let hosts_start = base.find("://").map_or(0, |i| i + 3);
    let hosts_end = base[hosts_start..].find('/').map_or(base.len(), |i| hosts_start + i);
    let mut out = format!("{}/{db}", &base[..hosts_end]);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

/// A unique database name for one test store.
pub fn unique_db_name(tag: &str) -> String {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    format!("luna_test_{tag}_{}_{n}_{:06x}", std::process::id(), rand::random::<u32>() & 0xff_ffff)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::mongo::MongoStore;
    use crate::store::sqlite::SqliteStore;

    fn assert_clean(failures: Vec<String>) {
        assert!(failures.is_empty(), "conformance failures:\n{}", failures.join("\n"));
    }

    #[test]
    fn database_is_swapped_in_uris() {
        assert_eq!(with_database("mongodb://h:1/old?replicaSet=rs0", "new"), "mongodb://h:1/new?replicaSet=rs0");
        assert_eq!(with_database("mongodb://h1,h2/?w=majority", "x"), "mongodb://h1,h2/x?w=majority");
        assert_eq!(with_database("mongodb://u:p@h", "x"), "mongodb://u:p@h/x");
        assert_eq!(with_database("mongodb+srv://c.example/db", "x"), "mongodb+srv://c.example/x");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite_in_memory() {
        assert_clean(
            run_all(|| async {
                SqliteStore::open(":memory:").map(|s| Arc::new(s) as Arc<dyn Store>).map_err(|e| e.to_string())
            })
            .await,
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite_cached() {
        assert_clean(
            run_all(|| async {
                SqliteStore::open(":memory:")
                    .map(|s| Arc::new(crate::store::cache::CachedStore::new(s)) as Arc<dyn Store>)
                    .map_err(|e| e.to_string())
            })
            .await,
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let n = std::sync::atomic::AtomicU32::new(0);
        let failures = run_all(|| {
            let path = dir.path().join(format!("s{}/luna.db", n.fetch_add(1, std::sync::atomic::Ordering::SeqCst)));
            async move {
                let path = path.to_str().ok_or("tempdir path is not utf-8")?.to_string();
                SqliteStore::open(&path).map(|s| Arc::new(s) as Arc<dyn Store>).map_err(|e| e.to_string())
            }
        })
        .await;
        assert_clean(failures);
        let url = format!("sqlite://{}", dir.path().join("by-url/luna.db").display());
        open_by_url(&url).await.expect("open by url");
    }

    async fn mongo_suite(base: impl Fn(&str) -> String, tag: &str) -> Vec<String> {
        let names = std::sync::Mutex::new(Vec::new());
        let mut failures = run_all(|| {
            let name = unique_db_name(tag);
            if let Ok(mut n) = names.lock() {
                n.push(name.clone());
            }
            let url = base(&name);
            async move {
                let store = MongoStore::open(&url).await.map_err(|e| format!("open {url}: {e}"))?;
                if store.database_name() != name {
                    return Err(format!("{url} opened database {}", store.database_name()));
                }
                Ok(Arc::new(store) as Arc<dyn Store>)
            }
        })
        .await;
        let by_url = unique_db_name(tag);
        if let Err(e) = open_by_url(&base(&by_url)).await {
            failures.push(format!("open_by_url: {e}"));
        }
        let mut names = names.into_inner().unwrap_or_default();
        names.push(by_url);
        // Drop what the run created (matters on a real server).
        match mongodb::Client::with_uri_str(base("admin")).await {
            Ok(client) => {
                for n in names {
                    if let Err(e) = client.database(&n).drop().await {
                        failures.push(format!("dropping test database {n}: {e}"));
                    }
                }
            }
            Err(e) => failures.push(format!("cleanup client: {e}")),
        }
        failures
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn mongo_nx27017() {
        let Some(bin) = mongo_gate() else { return };
        let server = NxServer::start(&bin).await.expect("nx-27017 starts");
        assert_clean(mongo_suite(|db| server.url(db), "nx").await);
        // The database defaults to `luna` when the URL names none.
        let store = MongoStore::open(&format!("mongodb://127.0.0.1:{}/?replicaSet={NX_SET_NAME}", server.port()))
            .await
            .expect("open");
        assert_eq!(store.database_name(), "luna");
        // The same server without replicaSet in the url is refused, naming why.
        match MongoStore::open(&format!("mongodb://127.0.0.1:{}/luna", server.port())).await {
            Err(StoreError::NeedsReplicaSet(_)) => {}
            Err(e) => panic!("a standalone url: wanted NeedsReplicaSet, got {e}"),
            Ok(_) => panic!("a standalone url was accepted"),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "needs a real MongoDB server: set LUNA_TEST_MONGODB_URI=mongodb://host/ and run with --ignored"]
    async fn mongo_real_server() {
        let uri = std::env::var("LUNA_TEST_MONGODB_URI")
            .expect("set LUNA_TEST_MONGODB_URI=mongodb://host/ to run the suite on a real server");
        assert_clean(mongo_suite(|db| with_database(&uri, db), "real").await);
    }
}
