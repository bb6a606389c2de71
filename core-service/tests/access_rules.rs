//! Access rules through the core: versioned, stored once, removed exactly, and still there
//! after the core reopens on the same (real, local) storage.

use std::path::Path;
use std::sync::Arc;

use tributary_core::{Core, CoreConfig};
use tributary_proto::v1;
use tributary_storage::local::{LocalLogConfig, LocalLogStore};
use tributary_storage::redb_meta::RedbMetaStore;

async fn open(dir: &Path) -> Core {
    let log = LocalLogStore::open(dir.join("log"), LocalLogConfig::default()).unwrap();
    let meta = Arc::new(RedbMetaStore::open(dir.join("meta.redb")).unwrap());
    Core::open(log, meta, CoreConfig::default()).await.unwrap()
}

fn rule(name: &str, op: &str, deny: bool) -> v1::AccessRule {
    v1::AccessRule {
        principal: "User:alice".into(),
        resource_type: "topic".into(),
        resource_name: name.into(),
        pattern_type: v1::AccessPatternType::AccessPatternLiteral as i32,
        operation: op.into(),
        permission: if deny {
            v1::AccessPermission::AccessDeny
        } else {
            v1::AccessPermission::AccessAllow
        } as i32,
        host: "*".into(),
    }
}

#[tokio::test]
async fn rules_are_versioned_deduplicated_and_durable() {
    let dir = tempfile::tempdir().unwrap();
    let core = open(dir.path()).await;
    let (v0, rules) = core.list_access_rules("", 0).await.unwrap();
    assert_eq!((v0, rules.unwrap().len()), (0, 0));

    let (v1_, created) = core
        .create_access_rules("", &[rule("a", "read", false), rule("a", "read", false)])
        .await
        .unwrap();
    assert_eq!((v1_, created), (1, 1));
    // The same rule again changes nothing, not even the version.
    let (v, created) = core
        .create_access_rules("", &[rule("a", "read", false)])
        .await
        .unwrap();
    assert_eq!((v, created), (1, 0));
    let (v2, _) = core
        .create_access_rules("", &[rule("b", "write", true)])
        .await
        .unwrap();
    assert_eq!(v2, 2);
    // A cache at the current version is told "unchanged".
    assert_eq!(core.list_access_rules("", 2).await.unwrap(), (2, None));
    let (_, rules) = core.list_access_rules("", 1).await.unwrap();
    assert_eq!(rules.unwrap().len(), 2);

    // A bad rule adds nothing.
    let mut bad = rule("c", "read", false);
    bad.pattern_type = 0;
    assert!(
        core.create_access_rules("", &[rule("d", "read", false), bad])
            .await
            .is_err()
    );

    let (deleted, v3) = core
        .delete_access_rules("", &[rule("a", "read", false), rule("zz", "read", false)])
        .await
        .unwrap();
    assert_eq!(deleted, vec![rule("a", "read", false)]);
    assert_eq!(v3, 3);
    core.shutdown().await.unwrap();
    drop(core);

    let core = open(dir.path()).await;
    let (v, rules) = core.list_access_rules("default", 0).await.unwrap();
    assert_eq!(v, 3);
    assert_eq!(rules.unwrap(), vec![rule("b", "write", true)]);
    // Namespaces do not see each other's rules.
    assert_eq!(
        core.list_access_rules("other", 0)
            .await
            .unwrap()
            .1
            .unwrap()
            .len(),
        0
    );
    core.shutdown().await.unwrap();
}
