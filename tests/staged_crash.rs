//! A staged transaction (routed publish to two queues + an ack, AMQP `tx`'s unit in the core)
//! is all or nothing across `kill -9` of the core: a child server runs transactions one after
//! the other (enqueue a job, lease it, stage "publish the result to a fanout address + ack
//! the job", resolve commit), is killed with SIGKILL at a random moment, restarts on the same
//! data directory; then every transaction whose commit was answered has its result in both
//! queues and its job gone, and no transaction is there in part (one queue and not the other,
//! or the result without the ack). Transactions caught between stage and resolve are
//! committed after the restart, which makes them whole too.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use common::{Server, free_port_args};
use rand::Rng;
use tributary_gateway_common::CoreClient;
use tributary_proto::v1;

const ROUNDS: usize = 8;

fn qid(name: &str) -> Option<v1::QueueId> {
    Some(v1::QueueId {
        namespace: "default".into(),
        name: name.into(),
    })
}

async fn setup(client: &CoreClient) {
    let mut admin = client.admin.clone();
    for q in ["out-a", "out-b"] {
        admin
            .declare_queue(v1::DeclareQueueRequest {
                id: qid(q),
                durable: true,
                ..Default::default()
            })
            .await
            .unwrap();
    }
    admin
        .declare_address(v1::DeclareAddressRequest {
            namespace: "default".into(),
            name: "fx".into(),
            kind: v1::AddressKind::Fanout as i32,
            durable: true,
            ..Default::default()
        })
        .await
        .unwrap();
    for q in ["out-a", "out-b"] {
        admin
            .bind(v1::BindRequest {
                binding: Some(v1::Binding {
                    namespace: "default".into(),
                    source_address: "fx".into(),
                    destination: Some(v1::binding::Destination::Queue(q.into())),
                    ..Default::default()
                }),
            })
            .await
            .unwrap();
    }
}

fn record(v: &str) -> v1::Record {
    v1::Record {
        value: Bytes::from(v.to_string()),
        ..Default::default()
    }
}

/// Each round's jobs go to a queue of its own (`jobs-<round>`): one left over by a kill
/// (enqueued, not yet staged) does not get in the way of the next round's.
async fn declare_jobs(client: &CoreClient, round: usize) -> String {
    let name = format!("jobs-{round}");
    client
        .admin
        .clone()
        .declare_queue(v1::DeclareQueueRequest {
            id: qid(&name),
            durable: true,
            ..Default::default()
        })
        .await
        .unwrap();
    name
}

/// One transaction: enqueue job `n` into `jobs`, lease it, stage the result + the ack, commit. Returns
/// the staged transaction's id once staged, and whether the commit was answered.
async fn one(
    client: &CoreClient,
    jobs: &str,
    n: u64,
    staged: &std::sync::Mutex<Vec<(u64, String)>>,
) -> bool {
    let mut queues = client.queues.clone();
    let mut txn = client.transactions.clone();
    let job = format!("job-{n}");
    if queues
        .enqueue(v1::EnqueueRequest {
            queue: qid(jobs),
            records: vec![record(&job)],
        })
        .await
        .is_err()
    {
        return false;
    }
    let Ok(got) = queues
        .receive(v1::ReceiveRequest {
            queue: qid(jobs),
            max_messages: 1,
            visibility_timeout_ms: 600_000,
            wait_time_ms: 5_000,
            ..Default::default()
        })
        .await
    else {
        return false;
    };
    let m = got
        .into_inner()
        .messages
        .pop()
        .expect("the job just enqueued");
    let value = m.record.unwrap_or_default().value;
    assert_eq!(&value[..], job.as_bytes(), "one job at a time");
    let Ok(r) = txn
        .stage_messages(v1::StageMessagesRequest {
            namespace: "default".into(),
            writes: vec![
                v1::StagedWrite {
                    write: Some(v1::staged_write::Write::Publish(v1::PublishRequest {
                        namespace: "default".into(),
                        address: "fx".into(),
                        records: vec![record(&format!("result-{n}"))],
                        ..Default::default()
                    })),
                    deliver_at_ms: 0,
                },
                v1::StagedWrite {
                    write: Some(v1::staged_write::Write::Ack(v1::AckRequest {
                        queue: qid(jobs),
                        lease_ids: vec![m.lease_id],
                        no_wait_durable: false,
                    })),
                    deliver_at_ms: 0,
                },
            ],
            ..Default::default()
        })
        .await
    else {
        return false;
    };
    let id = r.into_inner().transaction_id;
    staged.lock().unwrap().push((n, id.clone()));
    txn.resolve_staged(v1::ResolveStagedRequest {
        namespace: "default".into(),
        transaction_id: id,
        commit: true,
    })
    .await
    .is_ok()
}

/// Every value in a queue (leased and then released again), with how often it is there.
async fn contents(client: &CoreClient, queue: &str) -> HashMap<String, usize> {
    let mut queues = client.queues.clone();
    let mut out: HashMap<String, usize> = HashMap::new();
    let mut leases = Vec::new();
    loop {
        let got = queues
            .receive(v1::ReceiveRequest {
                queue: qid(queue),
                max_messages: 100,
                visibility_timeout_ms: 60_000,
                wait_time_ms: 0,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .messages;
        if got.is_empty() {
            break;
        }
        for m in got {
            let v = m.record.unwrap_or_default().value;
            *out.entry(String::from_utf8_lossy(&v).into_owned())
                .or_default() += 1;
            leases.push(m.lease_id);
        }
    }
    if !leases.is_empty() {
        queues
            .change_lease(v1::ChangeLeaseRequest {
                queue: qid(queue),
                lease_ids: leases,
                visibility_timeout_ms: 0,
            })
            .await
            .unwrap();
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn staged_publish_and_ack_are_whole_across_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let args = free_port_args(dir.path());
    let mut rng = rand::rng();
    let mut answered: Vec<u64> = Vec::new();
    let mut all_staged: Vec<(u64, String, usize)> = Vec::new();
    let mut next = 0u64;

    for round in 0..ROUNDS {
        let server = Server::start(&args);
        let client = server.client();
        if round == 0 {
            setup(&client).await;
        }
        let jobs = declare_jobs(&client, round).await;
        let staged = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let done = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let worker = {
            let (client, staged, done) = (client.clone(), staged.clone(), done.clone());
            let start = next;
            tokio::spawn(async move {
                for n in start.. {
                    if !one(&client, &jobs, n, &staged).await {
                        return;
                    }
                    done.lock().unwrap().push(n);
                }
            })
        };
        // Let some commits be answered, then kill at a random moment.
        let wanted = rng.random_range(1..20);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while done.lock().unwrap().len() < wanted {
            assert!(
                tokio::time::Instant::now() < deadline,
                "transactions stalled"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        tokio::time::sleep(Duration::from_micros(rng.random_range(0..20_000))).await;
        server.kill9();
        worker.await.unwrap();
        answered.extend(done.lock().unwrap().iter().copied());
        let staged = std::mem::take(&mut *staged.lock().unwrap());
        next += 100_000;
        all_staged.extend(staged.into_iter().map(|(n, id)| (n, id, round)));
    }

    let server = Server::start(&args);
    let client = server.client();
    // Transactions caught between stage and resolve: committing now makes them whole (a
    // retry of one already committed answers resolved = false and writes nothing again).
    let mut txn = client.transactions.clone();
    for (n, id, _) in &all_staged {
        let resolved = txn
            .resolve_staged(v1::ResolveStagedRequest {
                namespace: "default".into(),
                transaction_id: id.clone(),
                commit: true,
            })
            .await
            .unwrap()
            .into_inner()
            .resolved;
        if answered.contains(n) {
            assert!(!resolved, "the answered commit of {n} was not durable");
        }
    }
    let a = contents(&client, "out-a").await;
    let b = contents(&client, "out-b").await;
    let mut jobs = HashMap::new();
    for round in 0..ROUNDS {
        jobs.insert(round, contents(&client, &format!("jobs-{round}")).await);
    }
    for (n, _, round) in &all_staged {
        let r = format!("result-{n}");
        assert_eq!(a.get(&r), Some(&1), "{r} in out-a exactly once");
        assert_eq!(b.get(&r), Some(&1), "{r} in out-b exactly once");
        assert_eq!(
            jobs[round].get(&format!("job-{n}")),
            None,
            "job-{n} acked with its result"
        );
    }
    assert_eq!(
        a.len(),
        all_staged.len(),
        "no result without its transaction"
    );
    assert_eq!(b.len(), all_staged.len());
    assert!(
        answered.len() >= ROUNDS,
        "each round answered a commit: {answered:?}"
    );
    server.kill9();
}
