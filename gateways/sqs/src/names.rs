//! Queue names, URLs and ARNs: `http://<host>/<account>/<name>` and
//! `arn:aws:sqs:<region>:<account>:<name>`, with the account and region the gateway is
//! configured with.

use crate::error::{SqsError, SqsResult};

/// Longest queue name, `.fifo` included.
const MAX_NAME: usize = 80;

/// Where this gateway's queues live: one account (a core namespace) in one region.
#[derive(Debug, Clone)]
pub struct Identity {
    pub region: String,
    pub account_id: String,
    /// The core namespace the account's queues are in.
    pub namespace: String,
}

impl Identity {
    pub fn arn(&self, name: &str) -> String {
        format!("arn:aws:sqs:{}:{}:{name}", self.region, self.account_id)
    }

    pub fn url(&self, base: &str, name: &str) -> String {
        format!("{base}/{}/{name}", self.account_id)
    }

    /// The queue an ARN names, if it is one of this account's.
    pub fn name_of_arn(&self, parameter: &str, arn: &str) -> SqsResult<String> {
        let parts: Vec<&str> = arn.split(':').collect();
        match parts.as_slice() {
            ["arn", _, "sqs", _, account, name] if !name.is_empty() => {
                if *account != self.account_id {
                    return Err(SqsError::no_queue());
                }
                Ok(name.to_string())
            }
            _ => Err(SqsError::bad_value(parameter, arn, "is not a valid ARN")),
        }
    }

    /// The queue a QueueUrl (or a request path) names: `.../<account>/<name>`, or the
    /// legacy `.../queue/<name>` and `.../<name>` forms.
    pub fn name_of_url(&self, url: &str) -> SqsResult<String> {
        let path = match url.split_once("://") {
            Some((_, rest)) => rest.split_once('/').map_or("", |(_, p)| p),
            None => url.trim_start_matches('/'),
        };
        let path = path.split(['?', '#']).next().unwrap_or("");
        let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        match segments.as_slice() {
            [name] => Ok(name.to_string()),
            ["queue", name] => Ok(name.to_string()),
            [account, name] if *account == self.account_id => Ok(name.to_string()),
            [_, _] => Err(SqsError::no_queue()),
            _ => Err(SqsError::bad_value("QueueUrl", url, "is not a queue URL")),
        }
    }
}

/// A name SQS accepts: 1 to 80 of A-Z a-z 0-9 - _, a FIFO queue's ending in `.fifo`.
pub fn check_queue_name(name: &str, fifo: bool) -> SqsResult<()> {
    let stem = if fifo {
        name.strip_suffix(".fifo").ok_or_else(|| {
            SqsError::invalid_parameter_value("The name of a FIFO queue can only include alphanumeric characters, hyphens, or underscores, must end with .fifo suffix and be 1 to 80 in length.")
        })?
    } else {
        name
    };
    let ok = !stem.is_empty()
        && name.len() <= MAX_NAME
        && stem
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else if fifo {
        Err(SqsError::invalid_parameter_value(
            "The name of a FIFO queue can only include alphanumeric characters, hyphens, or underscores, must end with .fifo suffix and be 1 to 80 in length.",
        ))
    } else {
        Err(SqsError::invalid_parameter_value(
            "Can only include alphanumeric characters, hyphens, or underscores. 1 to 80 in length",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> Identity {
        Identity {
            region: "us-east-1".into(),
            account_id: "000000000000".into(),
            namespace: "default".into(),
        }
    }

    #[test]
    fn urls_and_arns() {
        let i = id();
        assert_eq!(
            i.name_of_url("http://localhost:9324/000000000000/q1")
                .unwrap(),
            "q1"
        );
        assert_eq!(
            i.name_of_url("http://localhost:9324/queue/q1").unwrap(),
            "q1"
        );
        assert_eq!(i.name_of_url("/000000000000/q.fifo").unwrap(), "q.fifo");
        assert_eq!(
            i.name_of_url("http://h/111111111111/q1").unwrap_err().code,
            "AWS.SimpleQueueService.NonExistentQueue"
        );
        assert!(i.name_of_url("http://h/").is_err());
        assert_eq!(i.name_of_arn("SourceArn", &i.arn("dlq")).unwrap(), "dlq");
        assert!(i.name_of_arn("SourceArn", "arn:aws:sns:x:y:z").is_err());
        assert!(check_queue_name("a-b_C9", false).is_ok());
        assert!(check_queue_name("a.fifo", false).is_err());
        assert!(check_queue_name("a.fifo", true).is_ok());
        assert!(check_queue_name(".fifo", true).is_err());
        assert!(check_queue_name(&"x".repeat(81), false).is_err());
        assert!(check_queue_name("", false).is_err());
    }
}
