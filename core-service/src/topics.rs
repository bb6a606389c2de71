//! MQTT-style topic names and filters: validation, matching and the subscription index.
//!
//! The index is a trie over topic levels, so routing a message costs the depth of its topic
//! times the few branches (`+`, `#`, the exact level) at each step, not the number of
//! subscriptions.

use crate::router::pattern::{MQTT_TOPIC, PatternTrie};
use std::sync::Arc;

/// Why a topic name or filter is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    #[error("empty topic")]
    Empty,
    #[error("topic contains a NUL character")]
    Nul,
    #[error("topic name contains a wildcard")]
    WildcardInName,
    #[error("'#' must be the last level and alone in it")]
    BadMultiLevel,
    #[error("'+' must be alone in its level")]
    BadSingleLevel,
    #[error("shared subscription needs $share/<group>/<filter> with a group free of + # /")]
    BadShare,
}

/// Checks a topic name a message is published to.
pub fn validate_name(topic: &str) -> Result<(), TopicError> {
    if topic.is_empty() {
        return Err(TopicError::Empty);
    }
    if topic.contains('\0') {
        return Err(TopicError::Nul);
    }
    if topic.contains(['+', '#']) {
        return Err(TopicError::WildcardInName);
    }
    Ok(())
}

/// Checks a plain topic filter (no `$share/` prefix).
pub fn validate_filter(filter: &str) -> Result<(), TopicError> {
    if filter.is_empty() {
        return Err(TopicError::Empty);
    }
    if filter.contains('\0') {
        return Err(TopicError::Nul);
    }
    let levels: Vec<&str> = filter.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        if level.contains('#') && (*level != "#" || i + 1 != levels.len()) {
            return Err(TopicError::BadMultiLevel);
        }
        if level.contains('+') && *level != "+" {
            return Err(TopicError::BadSingleLevel);
        }
    }
    Ok(())
}

/// A subscription filter split into its share group (if any) and the topic filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedFilter<'a> {
    pub group: Option<&'a str>,
    pub filter: &'a str,
}

pub fn parse_filter(raw: &str) -> Result<ParsedFilter<'_>, TopicError> {
    if let Some(rest) = raw.strip_prefix("$share/") {
        let (group, filter) = rest.split_once('/').ok_or(TopicError::BadShare)?;
        if group.is_empty() || group.contains(['+', '#']) {
            return Err(TopicError::BadShare);
        }
        validate_filter(filter)?;
        return Ok(ParsedFilter {
            group: Some(group),
            filter,
        });
    }
    validate_filter(raw)?;
    Ok(ParsedFilter {
        group: None,
        filter: raw,
    })
}

/// Whether `topic` matches `filter` (both already valid). Topics starting with `$` are not
/// matched by a wildcard in the first level.
pub fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// One subscription in the index: who, through which filter string (as subscribed, with
/// any `$share/` prefix), and its share group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub client: Arc<str>,
    pub raw_filter: Arc<str>,
    pub group: Option<Arc<str>>,
}

/// Subscriptions of one namespace, indexed by filter level: the router's pattern trie with
/// the MQTT syntax (one matching structure for AMQP topic bindings and MQTT filters).
#[derive(Debug)]
pub struct SubscriptionTree {
    trie: PatternTrie<Entry>,
    len: usize,
}

impl Default for SubscriptionTree {
    fn default() -> Self {
        Self {
            trie: PatternTrie::new(MQTT_TOPIC),
            len: 0,
        }
    }
}

impl SubscriptionTree {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds or keeps the subscription of `entry.client` through `entry.raw_filter`.
    pub fn insert(&mut self, filter: &str, entry: Entry) {
        if self.trie.insert(filter, entry) {
            self.len += 1;
        }
    }

    /// Removes a subscription; returns whether it was there.
    pub fn remove(&mut self, filter: &str, client: &str, raw_filter: &str) -> bool {
        let group = parse_filter(raw_filter)
            .ok()
            .and_then(|p| p.group)
            .map(Arc::from);
        let entry = Entry {
            client: Arc::from(client),
            raw_filter: Arc::from(raw_filter),
            group,
        };
        let removed = self.trie.remove(filter, &entry);
        if removed {
            self.len -= 1;
        }
        removed
    }

    /// Calls `found` for every subscription whose filter matches `topic`.
    pub fn for_each_match(&self, topic: &str, found: impl FnMut(&Entry)) {
        self.trie.for_each_match(topic, found);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(client: &str, raw: &str) -> Entry {
        Entry {
            client: client.into(),
            raw_filter: raw.into(),
            group: None,
        }
    }

    fn matched(tree: &SubscriptionTree, topic: &str) -> Vec<String> {
        let mut v = Vec::new();
        tree.for_each_match(topic, |e| v.push(format!("{}:{}", e.client, e.raw_filter)));
        v.sort();
        v
    }

    #[test]
    fn filters_are_validated() {
        for ok in ["a", "a/b", "+", "#", "a/+/c", "a/#", "/", "+/+", "$SYS/#"] {
            assert_eq!(validate_filter(ok), Ok(()), "{ok}");
        }
        for bad in ["", "a#", "a/#/b", "a+", "a/b+/c", "#/a", "a\0b"] {
            assert!(validate_filter(bad).is_err(), "{bad}");
        }
        assert_eq!(validate_name("a/+"), Err(TopicError::WildcardInName));
        assert_eq!(validate_name(""), Err(TopicError::Empty));
        assert!(parse_filter("$share/g/a/#").unwrap().group == Some("g"));
        assert!(parse_filter("$share//a").is_err());
        assert!(parse_filter("$share/g").is_err());
        assert!(parse_filter("$share/g+/a").is_err());
    }

    #[test]
    fn matching_follows_the_spec() {
        assert!(matches("sport/tennis/#", "sport/tennis"));
        assert!(matches("sport/#", "sport/tennis/player1"));
        assert!(matches("sport/+/player1", "sport/tennis/player1"));
        assert!(!matches("sport/+", "sport/tennis/player1"));
        assert!(matches("+/+", "/finance"));
        assert!(matches("/+", "/finance"));
        assert!(!matches("+", "/finance"));
        assert!(matches("#", "a"));
        assert!(!matches("#", "$SYS/uptime"));
        assert!(!matches("+/uptime", "$SYS/uptime"));
        assert!(matches("$SYS/#", "$SYS/uptime"));
    }

    #[test]
    fn tree_agrees_with_matches() {
        let filters = [
            "a", "a/b", "a/+", "a/#", "+/b", "#", "+", "+/+", "a/b/c", "$SYS/#", "/", "/+", "+/#",
        ];
        let topics = ["a", "a/b", "a/b/c", "b", "/", "/x", "$SYS/x", "$SYS", "x/b"];
        let mut tree = SubscriptionTree::default();
        for f in filters {
            tree.insert(f, entry("c", f));
        }
        assert_eq!(tree.len(), filters.len());
        for t in topics {
            let mut want: Vec<String> = filters
                .iter()
                .filter(|f| matches(f, t))
                .map(|f| format!("c:{f}"))
                .collect();
            want.sort();
            assert_eq!(matched(&tree, t), want, "topic {t}");
        }
        for f in filters {
            assert!(tree.remove(f, "c", f));
        }
        assert!(tree.is_empty());
        assert!(tree.trie.is_empty());
    }
}
