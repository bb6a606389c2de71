//! Topic access control: ordered allow/deny rules by user or client, first match wins.

/// What a rule governs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Publish,
    Subscribe,
    Both,
}

/// One rule. `filter` may contain `%u` (user name) and `%c` (client id).
#[derive(Debug, Clone)]
pub struct AclRule {
    /// User name the rule is for; `None` = everyone.
    pub user: Option<String>,
    /// Client id the rule is for; `None` = every client.
    pub client: Option<String>,
    pub action: Action,
    pub filter: String,
    pub allow: bool,
}

#[derive(Debug, Clone, Default)]
pub struct Acl {
    pub rules: Vec<AclRule>,
    /// When no rule matches: deny (true) or allow (false, the default).
    pub deny_by_default: bool,
}

impl Acl {
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty() && !self.deny_by_default
    }

    fn decide(
        &self,
        user: Option<&str>,
        client: &str,
        action: Action,
        covered: impl Fn(&str) -> bool,
    ) -> bool {
        for r in &self.rules {
            if r.user.as_deref().is_some_and(|u| Some(u) != user) {
                continue;
            }
            if r.client.as_deref().is_some_and(|c| c != client) {
                continue;
            }
            if r.action != Action::Both && r.action != action {
                continue;
            }
            // %u with no user name never matches, so anonymous clients get no per-user topics.
            if r.filter.contains("%u") && user.is_none() {
                continue;
            }
            let filter = r
                .filter
                .replace("%u", user.unwrap_or(""))
                .replace("%c", client);
            if covered(&filter) {
                return r.allow;
            }
        }
        !self.deny_by_default
    }

    pub fn may_publish(&self, user: Option<&str>, client: &str, topic: &str) -> bool {
        self.decide(user, client, Action::Publish, |f| {
            crate::topic::matches(f, topic)
        })
    }

    /// A subscription is allowed when the rule's filter covers every topic it can match.
    pub fn may_subscribe(&self, user: Option<&str>, client: &str, filter: &str) -> bool {
        self.decide(user, client, Action::Subscribe, |f| covers(f, filter))
    }
}

/// Whether every topic matched by `sub` is matched by `rule`.
pub fn covers(rule: &str, sub: &str) -> bool {
    let mut r = rule.split('/');
    let mut s = sub.split('/');
    loop {
        match (r.next(), s.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(l)) if l != "#" => {}
            (Some(a), Some(b)) if a == b && a != "+" && a != "#" => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(user: Option<&str>, action: Action, filter: &str, allow: bool) -> AclRule {
        AclRule {
            user: user.map(str::to_string),
            client: None,
            action,
            filter: filter.into(),
            allow,
        }
    }

    #[test]
    fn first_match_wins_with_substitution() {
        let acl = Acl {
            rules: vec![
                rule(None, Action::Both, "users/%u/#", true),
                rule(None, Action::Both, "users/#", false),
                rule(Some("admin"), Action::Subscribe, "#", true),
                rule(None, Action::Publish, "ro/#", false),
            ],
            deny_by_default: false,
        };
        assert!(acl.may_publish(Some("bob"), "c", "users/bob/x"));
        assert!(!acl.may_publish(Some("bob"), "c", "users/alice/x"));
        assert!(!acl.may_publish(None, "c", "users/x"));
        assert!(acl.may_subscribe(Some("bob"), "c", "users/bob/+"));
        assert!(!acl.may_subscribe(Some("bob"), "c", "users/+/x"));
        assert!(!acl.may_publish(Some("bob"), "c", "ro/a"));
        assert!(acl.may_subscribe(Some("bob"), "c", "ro/a"));
        assert!(acl.may_subscribe(Some("admin"), "c", "a/#"));
    }

    #[test]
    fn covering() {
        assert!(covers("a/#", "a/b/+"));
        assert!(covers("a/+", "a/b"));
        assert!(!covers("a/+", "a/#"));
        assert!(!covers("a/b", "a/+"));
        assert!(covers("#", "#"));
    }
}
