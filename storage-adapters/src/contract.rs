//! The behaviour every [`MetaStore`] must show, as one suite each adapter's tests run.
//!
//! The core relies on exactly these properties (ordered byte keys, atomic multi-key
//! compare-and-set, a failed check applying nothing), so an adapter that passes here can
//! hold the core's metadata. Each check panics with a message naming what broke; the suite
//! is public so that adapters backed by external servers (etcd, SQL, Redis) run it from
//! integration tests against a real server.

use std::sync::Arc;

use crate::{Check, MetaStore, Op};

fn put(key: &[u8], value: &[u8]) -> Op {
    Op::Put {
        key: key.to_vec(),
        value: value.to_vec(),
    }
}

fn check(key: &[u8], value: Option<&[u8]>) -> Check {
    Check {
        key: key.to_vec(),
        value: value.map(<[u8]>::to_vec),
    }
}

async fn value(store: &dyn MetaStore, key: &[u8]) -> Option<Vec<u8>> {
    store
        .get(key)
        .await
        .unwrap_or_else(|e| panic!("get {key:?}: {e}"))
        .map(|v| v.to_vec())
}

/// Runs every check against an empty store. `store` must see no other writers meanwhile.
pub async fn meta_store(store: Arc<dyn MetaStore>) {
    let s = &*store;
    gets_puts_and_deletes(s).await;
    keys_are_ordered_bytes(s).await;
    scans_respect_bounds_and_limits(s).await;
    transactions_are_all_or_nothing(s).await;
    compare_and_set_semantics(s).await;
    values_of_every_size(s).await;
    concurrent_compare_and_set_loses_no_update(store.clone()).await;
    concurrent_creates_have_one_winner(store.clone()).await;
}

async fn gets_puts_and_deletes(s: &dyn MetaStore) {
    assert_eq!(
        value(s, b"c/missing").await,
        None,
        "a missing key reads None"
    );
    s.put(b"c/k", b"v1").await.unwrap();
    assert_eq!(value(s, b"c/k").await.as_deref(), Some(&b"v1"[..]));
    s.put(b"c/k", b"v2").await.unwrap();
    assert_eq!(
        value(s, b"c/k").await.as_deref(),
        Some(&b"v2"[..]),
        "put overwrites"
    );
    s.put(b"c/empty", b"").await.unwrap();
    assert_eq!(
        value(s, b"c/empty").await.as_deref(),
        Some(&b""[..]),
        "an empty value is a value, not an absent key"
    );
    s.delete(b"c/k").await.unwrap();
    assert_eq!(value(s, b"c/k").await, None, "delete removes");
    s.delete(b"c/never").await.unwrap();
    s.delete(b"c/empty").await.unwrap();
}

async fn keys_are_ordered_bytes(s: &dyn MetaStore) {
    // Keys the core writes hold big-endian integers: every byte value must survive and
    // order as unsigned bytes (0x00 before 0x7f before 0x80 before 0xff), with a key
    // ordering before its extensions.
    let keys: Vec<Vec<u8>> = vec![
        b"o/".to_vec(),
        b"o/\x00".to_vec(),
        b"o/\x00\x00".to_vec(),
        b"o/\x00\x01".to_vec(),
        b"o/\x01".to_vec(),
        b"o/A".to_vec(),
        b"o/a".to_vec(),
        b"o/\x7f".to_vec(),
        b"o/\x80".to_vec(),
        b"o/\xc3\x28".to_vec(),
        b"o/\xfe\xff".to_vec(),
        b"o/\xff".to_vec(),
        b"o/\xff\x00".to_vec(),
        b"o/\xff\xff\xff".to_vec(),
    ];
    // Written in reverse so that an adapter returning insertion order fails.
    for (i, k) in keys.iter().enumerate().rev() {
        s.put(k, format!("{i}").as_bytes()).await.unwrap();
    }
    let got = s.scan_prefix(b"o/", 1000).await.unwrap();
    let got_keys: Vec<Vec<u8>> = got.iter().map(|(k, _)| k.clone()).collect();
    assert_eq!(got_keys, keys, "scan returns keys in unsigned byte order");
    for (i, (_, v)) in got.iter().enumerate() {
        assert_eq!(&v[..], format!("{i}").as_bytes(), "value of key {i}");
    }
    // A prefix of only 0xff bytes has no upper bound key: scan_prefix's fallback.
    s.put(b"\xff\xffz", b"top").await.unwrap();
    let top = s.scan_prefix(b"\xff\xff", 10).await.unwrap();
    assert_eq!(top.len(), 1, "scan of an all-0xff prefix");
    s.delete(b"\xff\xffz").await.unwrap();
    for k in &keys {
        s.delete(k).await.unwrap();
    }
    assert!(s.scan_prefix(b"o/", 10).await.unwrap().is_empty());
}

async fn scans_respect_bounds_and_limits(s: &dyn MetaStore) {
    for i in 0..20u8 {
        s.put(&[b's', b'/', i], &[i]).await.unwrap();
    }
    s.put(b"r/before", b"x").await.unwrap();
    s.put(b"t/after", b"x").await.unwrap();
    let all = s.scan(b"s/", b"s0", 100).await.unwrap();
    assert_eq!(all.len(), 20, "start inclusive, end exclusive");
    let mid = s
        .scan(&[b's', b'/', 5], &[b's', b'/', 9], 100)
        .await
        .unwrap();
    let mid_keys: Vec<u8> = mid.iter().map(|(k, _)| k[2]).collect();
    assert_eq!(mid_keys, vec![5, 6, 7, 8], "start inclusive, end exclusive");
    let limited = s.scan(b"s/", b"s0", 3).await.unwrap();
    let limited_keys: Vec<u8> = limited.iter().map(|(k, _)| k[2]).collect();
    assert_eq!(limited_keys, vec![0, 1, 2], "limit keeps the first keys");
    assert!(
        s.scan(b"s/\x09", b"s/\x05", 100).await.unwrap().is_empty(),
        "start after end gives nothing"
    );
    assert!(
        s.scan(b"s/\x05", b"s/\x05", 100).await.unwrap().is_empty(),
        "start equal to end gives nothing"
    );
    assert_eq!(s.scan_prefix(b"s/", 7).await.unwrap().len(), 7);
    for i in 0..20u8 {
        s.delete(&[b's', b'/', i]).await.unwrap();
    }
    s.delete(b"r/before").await.unwrap();
    s.delete(b"t/after").await.unwrap();
}

async fn transactions_are_all_or_nothing(s: &dyn MetaStore) {
    // Several checks and several ops, all applied.
    assert!(
        s.txn(
            vec![check(b"x/a", None), check(b"x/b", None)],
            vec![put(b"x/a", b"1"), put(b"x/b", b"2"), put(b"x/c", b"3")],
        )
        .await
        .unwrap(),
        "checks on absent keys hold"
    );
    // One failing check among passing ones: nothing applied.
    assert!(
        !s.txn(
            vec![check(b"x/a", Some(b"1")), check(b"x/b", Some(b"wrong"))],
            vec![
                put(b"x/a", b"changed"),
                Op::Delete {
                    key: b"x/c".to_vec()
                },
                put(b"x/new", b"n"),
            ],
        )
        .await
        .unwrap(),
        "a failed check reports false"
    );
    assert_eq!(value(s, b"x/a").await.as_deref(), Some(&b"1"[..]));
    assert_eq!(value(s, b"x/c").await.as_deref(), Some(&b"3"[..]));
    assert_eq!(
        value(s, b"x/new").await,
        None,
        "a failed txn applies nothing"
    );
    // An absent-check on a present key fails.
    assert!(
        !s.txn(vec![check(b"x/a", None)], vec![put(b"x/z", b"z")])
            .await
            .unwrap()
    );
    assert_eq!(value(s, b"x/z").await, None);
    // An empty value checks as present and empty, not absent.
    s.put(b"x/e", b"").await.unwrap();
    assert!(
        !s.txn(vec![check(b"x/e", None)], vec![]).await.unwrap(),
        "an empty value is not an absent key"
    );
    assert!(s.txn(vec![check(b"x/e", Some(b""))], vec![]).await.unwrap());
    // Mixed puts and deletes in one txn, a delete of a missing key included, and ops on
    // the checked keys themselves.
    assert!(
        s.txn(
            vec![check(b"x/a", Some(b"1")), check(b"x/gone", None)],
            vec![
                Op::Delete {
                    key: b"x/a".to_vec()
                },
                Op::Delete {
                    key: b"x/gone".to_vec()
                },
                put(b"x/b", b"22"),
            ],
        )
        .await
        .unwrap()
    );
    assert_eq!(value(s, b"x/a").await, None);
    assert_eq!(value(s, b"x/b").await.as_deref(), Some(&b"22"[..]));
    // A txn with many ops (the core writes batches of timers and offsets this way).
    let many: Vec<Op> = (0..100u32)
        .map(|i| put(format!("x/m/{i:03}").as_bytes(), &i.to_be_bytes()))
        .collect();
    assert!(s.txn(vec![], many).await.unwrap());
    assert_eq!(s.scan_prefix(b"x/m/", 1000).await.unwrap().len(), 100);
    let deletes: Vec<Op> = s
        .scan_prefix(b"x/", 1000)
        .await
        .unwrap()
        .into_iter()
        .map(|(key, _)| Op::Delete { key })
        .collect();
    assert!(s.txn(vec![], deletes).await.unwrap());
    assert!(s.scan_prefix(b"x/", 10).await.unwrap().is_empty());
}

async fn compare_and_set_semantics(s: &dyn MetaStore) {
    assert!(s.compare_and_set(b"k/1", None, Some(b"a")).await.unwrap());
    assert!(
        !s.compare_and_set(b"k/1", None, Some(b"b")).await.unwrap(),
        "create-if-absent fails when present"
    );
    assert!(
        !s.compare_and_set(b"k/1", Some(b"b"), Some(b"c"))
            .await
            .unwrap()
    );
    assert!(
        s.compare_and_set(b"k/1", Some(b"a"), Some(b"c"))
            .await
            .unwrap()
    );
    assert_eq!(value(s, b"k/1").await.as_deref(), Some(&b"c"[..]));
    assert!(
        !s.compare_and_set(b"k/1", Some(b"a"), None).await.unwrap(),
        "delete-if-equal fails on another value"
    );
    assert!(s.compare_and_set(b"k/1", Some(b"c"), None).await.unwrap());
    assert_eq!(value(s, b"k/1").await, None);
}

async fn values_of_every_size(s: &dyn MetaStore) {
    // Binary values with every byte, and a value of 256 KiB (group metadata and staged
    // transaction records can be that large).
    let every_byte: Vec<u8> = (0..=255u8).collect();
    s.put(b"v/bytes", &every_byte).await.unwrap();
    assert_eq!(value(s, b"v/bytes").await, Some(every_byte.clone()));
    let big: Vec<u8> = (0..256 * 1024).map(|i| (i % 251) as u8).collect();
    s.put(b"v/big", &big).await.unwrap();
    assert_eq!(value(s, b"v/big").await, Some(big.clone()));
    assert!(
        s.compare_and_set(b"v/big", Some(&big), Some(&every_byte))
            .await
            .unwrap(),
        "compare against a large value"
    );
    // A long key (the core's keys embed stream and group names up to 249 bytes).
    let long_key: Vec<u8> = [&b"v/"[..], &[b'k'; 600][..]].concat();
    s.put(&long_key, b"long").await.unwrap();
    assert_eq!(value(s, &long_key).await.as_deref(), Some(&b"long"[..]));
    for k in [&b"v/bytes"[..], &b"v/big"[..], &long_key[..]] {
        s.delete(k).await.unwrap();
    }
}

async fn concurrent_compare_and_set_loses_no_update(store: Arc<dyn MetaStore>) {
    const TASKS: u64 = 8;
    const EACH: u64 = 25;
    let key = b"n/counter";
    store.put(key, &0u64.to_be_bytes()).await.unwrap();
    let mut tasks = Vec::new();
    for _ in 0..TASKS {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut done = 0;
            while done < EACH {
                let cur = store.get(key).await.unwrap().expect("counter present");
                let n = u64::from_be_bytes(cur[..].try_into().unwrap());
                if store
                    .compare_and_set(key, Some(&cur), Some(&(n + 1).to_be_bytes()))
                    .await
                    .unwrap()
                {
                    done += 1;
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let end = store.get(key).await.unwrap().unwrap();
    assert_eq!(
        u64::from_be_bytes(end[..].try_into().unwrap()),
        TASKS * EACH,
        "every successful compare-and-set is one increment"
    );
    store.delete(key).await.unwrap();
}

async fn concurrent_creates_have_one_winner(store: Arc<dyn MetaStore>) {
    // Create-if-absent races on keys that do not exist yet: exactly one writer wins each,
    // and a txn checking several absent keys is not half-applied by a racing one.
    for round in 0..10u8 {
        let key = [b'w', b'/', round];
        let other = [b'w', b'/', round, b'+'];
        let mut tasks = Vec::new();
        for task in 0..6u8 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                store
                    .txn(
                        vec![check(&key, None), check(&other, None)],
                        vec![put(&key, &[task]), put(&other, &[task])],
                    )
                    .await
                    .unwrap()
            }));
        }
        let mut winners = 0;
        for t in tasks {
            winners += usize::from(t.await.unwrap());
        }
        assert_eq!(winners, 1, "round {round}: one create-if-absent wins");
        let a = value(&*store, &key).await.unwrap();
        let b = value(&*store, &other).await.unwrap();
        assert_eq!(a, b, "round {round}: both keys come from the winning txn");
        store.delete(&key).await.unwrap();
        store.delete(&other).await.unwrap();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use crate::memory::MemoryMetaStore;
    use crate::redb_meta::RedbMetaStore;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn memory_meta_store_keeps_the_contract() {
        super::meta_store(Arc::new(MemoryMetaStore::new())).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redb_meta_store_keeps_the_contract() {
        let dir = tempfile::tempdir().unwrap();
        super::meta_store(Arc::new(
            RedbMetaStore::open(dir.path().join("m.redb")).unwrap(),
        ))
        .await;
    }
}
