//! A Kafka Fetch over a deployment that spreads streams over shards (the core's placement
//! scheme `stream`): a Fetch names partitions of several topics, which may be served by
//! several core nodes, so it becomes one core Fetch per shard, sent to each stream's node.
//!
//! Each part waits as the client asked (`max_wait_ms`, `min_bytes`). When the first part
//! answers with records, the others are dropped and asked again without waiting: reads
//! change nothing, so a consumer gets what one shard had as soon as it has it, plus whatever
//! the others have by then, rather than the slowest part's wait. A first answer without
//! records (its wait ran out, or an error) waits for the others, so a shard that fails fast
//! does not turn the consumer's long poll into a busy loop. The parts share `max_bytes`
//! (each still returns a first batch whole, as Kafka does).

use futures::future::{join_all, select_all};
use tributary_proto::placement::{Scheme, shard_of_unit, stream_unit};
use tributary_proto::v1;

use crate::Gateway;

fn stream_of(p: &v1::FetchPartition) -> &str {
    p.stream.as_ref().map_or("", |s| s.name.as_str())
}

/// The core's answer for each of `req`'s partitions, in the request's order.
pub(crate) async fn fetch(
    gw: &Gateway,
    req: v1::FetchRequest,
) -> Vec<Result<v1::FetchedPartition, tonic::Status>> {
    // Parts by shard, each keeping the indexes of its partitions in the request.
    let mut parts: Vec<(u32, Vec<usize>)> = Vec::new();
    match gw.core.placement() {
        Some((Scheme::Stream, shards)) => {
            for (i, p) in req.partitions.iter().enumerate() {
                let unit = stream_unit(stream_of(p));
                let shard =
                    shard_of_unit(Scheme::Stream, &gw.config.namespace, Some(&unit), shards);
                match parts.iter_mut().find(|(s, _)| *s == shard) {
                    Some((_, indexes)) => indexes.push(i),
                    None => parts.push((shard, vec![i])),
                }
            }
        }
        // One namespace's partitions are in one shard.
        _ => parts.push((0, (0..req.partitions.len()).collect())),
    }
    if parts.len() == 1 {
        // One shard: the node of the first stream's, when streams are spread or there is one
        // topic (right under any scheme); the namespace's when several topics are asked
        // before the placement is known.
        let first = req.partitions.first().map(stream_of).unwrap_or_default();
        let one_stream = req.partitions.iter().all(|p| stream_of(p) == first);
        let spread = matches!(gw.core.placement(), Some((Scheme::Stream, _)));
        let core = if one_stream || spread {
            gw.core.for_stream(first)
        } else {
            gw.core.clone()
        };
        let count = req.partitions.len();
        return match core.streams.clone().fetch(req).await {
            Ok(r) => aligned(r.into_inner().partitions, count),
            Err(status) => (0..count).map(|_| Err(status.clone())).collect(),
        };
    }
    let max_bytes = if req.max_bytes > 0 {
        (req.max_bytes / parts.len() as i32).max(1)
    } else {
        req.max_bytes
    };
    let part_request = |indexes: &[usize], max_wait_ms: i32| v1::FetchRequest {
        partitions: indexes.iter().map(|&i| req.partitions[i].clone()).collect(),
        max_wait_ms,
        max_bytes,
        ..req.clone()
    };
    let send = |indexes: Vec<usize>, max_wait_ms: i32| {
        let name = stream_of(&req.partitions[indexes[0]]).to_string();
        let request = part_request(&indexes, max_wait_ms);
        let mut streams = gw.core.for_stream(&name).streams;
        Box::pin(async move {
            let count = indexes.len();
            let answer = match streams.fetch(request).await {
                Ok(r) => aligned(r.into_inner().partitions, count),
                Err(status) => (0..count).map(|_| Err(status.clone())).collect(),
            };
            (indexes, answer)
        })
    };
    let waiting: Vec<_> = parts
        .iter()
        .map(|(_, indexes)| send(indexes.clone(), req.max_wait_ms))
        .collect();
    let (first, done, rest) = select_all(waiting).await;
    let has_records = first
        .1
        .iter()
        .any(|r| r.as_ref().is_ok_and(|p| !p.batches.is_empty()));
    let mut answers = vec![first];
    if has_records {
        drop(rest);
        let again: Vec<_> = parts
            .into_iter()
            .enumerate()
            .filter(|(i, _)| *i != done)
            .map(|(_, (_, indexes))| send(indexes, 0))
            .collect();
        answers.extend(join_all(again).await);
    } else {
        answers.extend(join_all(rest).await);
    }
    let mut out: Vec<Option<Result<v1::FetchedPartition, tonic::Status>>> =
        (0..req.partitions.len()).map(|_| None).collect();
    for (indexes, answer) in answers {
        for (i, result) in indexes.into_iter().zip(answer) {
            out[i] = Some(result);
        }
    }
    out.into_iter()
        .map(|r| r.unwrap_or_else(|| Err(tonic::Status::internal("a fetch part was lost"))))
        .collect()
}

/// The core answers one entry per partition asked, in order; anything else is its bug,
/// answered as an error for the partitions it left out rather than a panic.
fn aligned(
    partitions: Vec<v1::FetchedPartition>,
    count: usize,
) -> Vec<Result<v1::FetchedPartition, tonic::Status>> {
    let mut out: Vec<_> = partitions.into_iter().take(count).map(Ok).collect();
    while out.len() < count {
        out.push(Err(tonic::Status::internal(
            "the core answered fewer partitions than asked",
        )));
    }
    out
}
