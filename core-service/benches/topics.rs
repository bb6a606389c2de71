//! Routing cost of the MQTT subscription index: one topic matched against 100,000
//! subscriptions (100,000 clients on `devices/<n>/<metric>` style filters, 1% with `+` and
//! `#` wildcards), and inserting / removing a subscription in that index.
//!
//! Run with `cargo bench -p tributary-core --bench topics`.

use std::sync::Arc;

use criterion::{Criterion, Throughput};
use tributary_core::topics::{Entry, SubscriptionTree};

const SUBSCRIPTIONS: usize = 100_000;

fn entry(client: &str, filter: &str) -> Entry {
    Entry {
        client: Arc::from(client),
        raw_filter: Arc::from(filter),
        group: None,
    }
}

fn filter(i: usize) -> String {
    match i % 100 {
        0 => format!("devices/{}/+", i / 100),
        1 => format!("devices/{}/#", i / 100),
        _ => format!("devices/{}/m{}", i / 100, i % 100),
    }
}

fn bench(c: &mut Criterion) {
    let mut tree = SubscriptionTree::default();
    for i in 0..SUBSCRIPTIONS {
        let f = filter(i);
        tree.insert(&f, entry(&format!("c{i}"), &f));
    }
    let mut group = c.benchmark_group("topics");
    group.throughput(Throughput::Elements(1));
    group.bench_function("match one topic in 100k subscriptions", |b| {
        let mut n = 0usize;
        b.iter(|| {
            n = (n + 7919) % SUBSCRIPTIONS;
            let topic = format!("devices/{}/m{}", n / 100, 2 + n % 98);
            let mut hits = 0;
            tree.for_each_match(&topic, |_| hits += 1);
            // The exact subscription, `+` and `#` of its device.
            assert_eq!(hits, 3);
        })
    });
    group.bench_function("insert and remove in 100k subscriptions", |b| {
        let f = "devices/extra/m1";
        b.iter(|| {
            tree.insert(f, entry("extra", f));
            assert!(tree.remove(f, "extra", f));
        })
    });
    group.finish();
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    bench(&mut c);
    c.final_summary();
}
