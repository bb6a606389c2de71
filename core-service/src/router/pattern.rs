//! One matching structure for every pattern language the router speaks: a trie over the
//! levels of a routing key, with a single-level and a multi-level wildcard. AMQP topic
//! exchanges (`.`, `*`, `#`, where `#` may stand anywhere) and MQTT filters (`/`, `+`, `#`
//! last, topics starting with `$` not matched by a leading wildcard) differ only in their
//! [`Syntax`]. Matching costs the key's depth times the few branches per level, not the
//! number of bindings.

use std::collections::HashMap;

/// How a pattern language spells levels and wildcards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Syntax {
    pub separator: char,
    pub one: &'static str,
    pub many: &'static str,
    /// MQTT: a key whose first level starts with `$` is not matched by a leading wildcard.
    pub dollar_is_system: bool,
    /// MQTT: `#` only as the last level.
    pub many_last_only: bool,
    /// An empty key or pattern has no levels (AMQP: `*` does not match the empty routing
    /// key, `#` does), rather than one empty level (MQTT).
    pub empty_has_no_levels: bool,
}

impl Syntax {
    fn levels<'a>(&self, s: &'a str) -> impl Iterator<Item = &'a str> + use<'a> {
        let none = self.empty_has_no_levels && s.is_empty();
        s.split(self.separator).filter(move |_| !none)
    }
}

pub(crate) const AMQP_TOPIC: Syntax = Syntax {
    separator: '.',
    one: "*",
    many: "#",
    dollar_is_system: false,
    many_last_only: false,
    empty_has_no_levels: true,
};

pub(crate) const MQTT_TOPIC: Syntax = Syntax {
    separator: '/',
    one: "+",
    many: "#",
    dollar_is_system: true,
    many_last_only: true,
    empty_has_no_levels: false,
};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum PatternError {
    #[error("'{0}' must be the last level of a filter")]
    ManyNotLast(&'static str),
    #[error("a wildcard must be alone in its level")]
    WildcardInLevel,
}

#[derive(Debug)]
struct Node<V> {
    exact: HashMap<Box<str>, Node<V>>,
    one: Option<Box<Node<V>>>,
    many: Option<Box<Node<V>>>,
    values: Vec<V>,
}

impl<V> Default for Node<V> {
    fn default() -> Self {
        Self {
            exact: HashMap::new(),
            one: None,
            many: None,
            values: Vec::new(),
        }
    }
}

impl<V> Node<V> {
    fn is_empty(&self) -> bool {
        self.values.is_empty() && self.exact.is_empty() && self.one.is_none() && self.many.is_none()
    }
}

/// Patterns with a value each (a binding), matched against routing keys.
#[derive(Debug)]
pub(crate) struct PatternTrie<V> {
    syntax: Syntax,
    root: Node<V>,
}

impl<V: PartialEq + Clone> PatternTrie<V> {
    pub fn new(syntax: Syntax) -> Self {
        Self {
            syntax,
            root: Node::default(),
        }
    }

    pub fn validate(&self, pattern: &str) -> Result<(), PatternError> {
        let s = self.syntax;
        let levels: Vec<&str> = pattern.split(s.separator).collect();
        for (i, level) in levels.iter().enumerate() {
            let wild = *level == s.one || *level == s.many;
            if !wild && (level.contains(s.one) || level.contains(s.many)) && s.many_last_only {
                return Err(PatternError::WildcardInLevel);
            }
            if *level == s.many && s.many_last_only && i + 1 != levels.len() {
                return Err(PatternError::ManyNotLast(s.many));
            }
        }
        Ok(())
    }

    /// Binds `value` with `pattern`; false when that value was bound with it already.
    pub fn insert(&mut self, pattern: &str, value: V) -> bool {
        let s = self.syntax;
        let mut node = &mut self.root;
        for level in s.levels(pattern) {
            node = if level == s.one {
                node.one.get_or_insert_with(Box::default)
            } else if level == s.many {
                node.many.get_or_insert_with(Box::default)
            } else {
                node.exact.entry(level.into()).or_default()
            };
        }
        if node.values.contains(&value) {
            return false;
        }
        node.values.push(value);
        true
    }

    /// True when nothing is bound (removals prune the nodes they empty).
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.root.is_empty()
    }

    /// Removes the value bound with this pattern; returns whether it was there.
    pub fn remove(&mut self, pattern: &str, value: &V) -> bool {
        let levels: Vec<&str> = self.syntax.levels(pattern).collect();
        Self::remove_at(&mut self.root, self.syntax, &levels, value)
    }

    fn remove_at(node: &mut Node<V>, s: Syntax, levels: &[&str], value: &V) -> bool {
        let Some((level, rest)) = levels.split_first() else {
            let before = node.values.len();
            node.values.retain(|v| v != value);
            return node.values.len() != before;
        };
        if *level == s.one {
            let Some(child) = node.one.as_mut() else {
                return false;
            };
            let r = Self::remove_at(child, s, rest, value);
            if child.is_empty() {
                node.one = None;
            }
            r
        } else if *level == s.many {
            let Some(child) = node.many.as_mut() else {
                return false;
            };
            let r = Self::remove_at(child, s, rest, value);
            if child.is_empty() {
                node.many = None;
            }
            r
        } else {
            let Some(child) = node.exact.get_mut(*level) else {
                return false;
            };
            let r = Self::remove_at(child, s, rest, value);
            if child.is_empty() {
                node.exact.remove(*level);
            }
            r
        }
    }

    /// Calls `found` for every value whose pattern matches `key` (a value bound by several
    /// matching patterns is reported once per pattern).
    pub fn for_each_match(&self, key: &str, mut found: impl FnMut(&V)) {
        let levels: Vec<&str> = self.syntax.levels(key).collect();
        let system =
            self.syntax.dollar_is_system && levels.first().is_some_and(|l| l.starts_with('$'));
        self.walk(&self.root, &levels, 0, system, &mut found);
    }

    fn walk(
        &self,
        node: &Node<V>,
        levels: &[&str],
        i: usize,
        system: bool,
        found: &mut impl FnMut(&V),
    ) {
        let wildcards = !(system && i == 0);
        if i == levels.len() {
            node.values.iter().for_each(&mut *found);
            // A trailing multi-level wildcard also matches zero levels ("a.#" matches "a").
            if let Some(many) = &node.many {
                self.walk_many(many, levels, i, found);
            }
            return;
        }
        if let Some(child) = node.exact.get(levels[i]) {
            self.walk(child, levels, i + 1, system, found);
        }
        if wildcards {
            if let Some(one) = &node.one {
                self.walk(one, levels, i + 1, system, found);
            }
            if let Some(many) = &node.many {
                self.walk_many(many, levels, i, found);
            }
        }
    }

    /// The multi-level wildcard swallows zero or more levels from `i` on.
    fn walk_many(&self, many: &Node<V>, levels: &[&str], i: usize, found: &mut impl FnMut(&V)) {
        if many.exact.is_empty() && many.one.is_none() && many.many.is_none() {
            // The common case: nothing after the wildcard, so it matches once.
            many.values.iter().for_each(&mut *found);
            return;
        }
        for j in i..=levels.len() {
            if j == levels.len() {
                many.values.iter().for_each(&mut *found);
                // "#.#" matches zero levels too.
                if let Some(m) = &many.many {
                    self.walk_many(m, levels, j, found);
                }
                continue;
            }
            if let Some(child) = many.exact.get(levels[j]) {
                self.walk(child, levels, j + 1, false, found);
            }
            if let Some(one) = &many.one {
                self.walk(one, levels, j + 1, false, found);
            }
            if let Some(m) = &many.many {
                self.walk_many(m, levels, j, found);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matches(syntax: Syntax, pattern: &str, key: &str) -> bool {
        let mut t = PatternTrie::new(syntax);
        t.insert(pattern, 1);
        let mut hit = false;
        t.for_each_match(key, |_| hit = true);
        hit
    }

    #[test]
    fn amqp_empty_key_has_no_words() {
        assert!(!matches(AMQP_TOPIC, "*", ""));
        assert!(matches(AMQP_TOPIC, "#", ""));
        assert!(matches(AMQP_TOPIC, "#.#", ""));
        assert!(matches(AMQP_TOPIC, "#.#", "a"));
        assert!(matches(AMQP_TOPIC, "", ""));
        assert!(!matches(AMQP_TOPIC, "", "a"));
        assert!(matches(MQTT_TOPIC, "+", ""));
    }

    #[test]
    fn amqp_topic_patterns() {
        let cases = [
            ("a.b.c", "a.b.c", true),
            ("a.*.c", "a.b.c", true),
            ("a.*.c", "a.c", false),
            ("a.#", "a", true),
            ("a.#", "a.b.c", true),
            ("#", "", true),
            ("#", "x.y", true),
            ("#.c", "a.b.c", true),
            ("#.c", "c", true),
            ("a.#.c", "a.c", true),
            ("a.#.c", "a.x.y.c", true),
            ("a.#.c", "a.x.y.d", false),
            ("*", "a.b", false),
            ("*.#", "a", true),
            ("a.*.#", "a", false),
            ("$x.*", "$x.y", true),
        ];
        for (p, k, want) in cases {
            assert_eq!(matches(AMQP_TOPIC, p, k), want, "{p} vs {k}");
        }
    }

    #[test]
    fn mqtt_filters() {
        let cases = [
            ("a/+/c", "a/b/c", true),
            ("a/#", "a", true),
            ("a/#", "a/b/c", true),
            ("+/b", "/b", true),
            ("#", "$SYS/x", false),
            ("+/x", "$SYS/x", false),
            ("$SYS/#", "$SYS/x", true),
            ("a//b", "a//b", true),
        ];
        for (p, k, want) in cases {
            assert_eq!(matches(MQTT_TOPIC, p, k), want, "{p} vs {k}");
        }
        let t: PatternTrie<u8> = PatternTrie::new(MQTT_TOPIC);
        assert!(t.validate("a/#/b").is_err());
        assert!(t.validate("a/b+").is_err());
        assert!(t.validate("a/+/#").is_ok());
    }

    #[test]
    fn remove_prunes_and_keeps_others() {
        let mut t = PatternTrie::new(AMQP_TOPIC);
        t.insert("a.*", 1);
        t.insert("a.*", 2);
        t.insert("a.#.z", 3);
        assert!(t.remove("a.*", &1));
        assert!(!t.remove("a.*", &1));
        let mut got = Vec::new();
        t.for_each_match("a.b", |v| got.push(*v));
        assert_eq!(got, vec![2]);
        assert!(t.remove("a.*", &2));
        assert!(t.remove("a.#.z", &3));
        assert!(t.root.is_empty());
    }
}
