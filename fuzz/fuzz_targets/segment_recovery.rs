//! Arbitrary bytes as a partition's segment and index files: opening the local log (crash
//! recovery or clean start) and reading everything must never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tributary_storage::local::{LocalLogConfig, LocalLogStore};
use tributary_storage::{LogStore, PartitionKey};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let dir = tempfile::tempdir_in(std::env::temp_dir()).unwrap();
    let part = dir.path().join("1-0");
    std::fs::create_dir_all(&part).unwrap();
    match mode % 3 {
        // A crash left this as the active segment.
        0 => std::fs::write(part.join(format!("{:020}.log", 0)), rest).unwrap(),
        // The same after a clean shutdown: damage must be reported, not cut.
        1 => {
            std::fs::write(part.join(format!("{:020}.log", 0)), rest).unwrap();
            std::fs::write(dir.path().join(".clean-shutdown"), b"clean\n").unwrap();
        }
        // A sealed segment with a fuzzed index, then an empty active segment.
        _ => {
            let split = rest.len() / 2;
            std::fs::write(part.join(format!("{:020}.index", 0)), &rest[..split]).unwrap();
            std::fs::write(part.join(format!("{:020}.log", 0)), &rest[split..]).unwrap();
            std::fs::write(part.join(format!("{:020}.log", 1)), b"").unwrap();
        }
    }
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    rt.block_on(async {
        let Ok(store) = LocalLogStore::open(dir.path(), LocalLogConfig::default()) else { return };
        let key = PartitionKey::new(1, 0);
        let Ok(bounds) = store.bounds(key).await else { return };
        let mut at = bounds.start_offset;
        while at < bounds.end_offset {
            match store.read(key, at, 1 << 20).await {
                Ok(batches) if !batches.is_empty() => at = batches.last().unwrap().next_offset(),
                _ => break,
            }
        }
        let _ = store.offset_for_timestamp(key, 0).await;
    });
});
