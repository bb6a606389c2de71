//! Topic checks the gateway makes before anything reaches the core (the core checks again).

/// Whether `topic` matches `filter`; `$` topics are not matched by a leading wildcard.
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

/// A topic name a client may publish to: not empty, no wildcard, no NUL.
pub fn valid_name(topic: &str) -> bool {
    !topic.is_empty() && !topic.contains(['+', '#', '\0'])
}

/// A subscription filter, plain or `$share/<group>/<filter>`.
pub fn valid_filter(raw: &str) -> bool {
    let filter = match raw.strip_prefix("$share/") {
        Some(rest) => match rest.split_once('/') {
            Some((group, f)) if !group.is_empty() && !group.contains(['+', '#']) => f,
            _ => return false,
        },
        None => raw,
    };
    if filter.is_empty() || filter.contains('\0') {
        return false;
    }
    let levels: Vec<&str> = filter.split('/').collect();
    levels.iter().enumerate().all(|(i, l)| {
        (!l.contains('#') || (*l == "#" && i + 1 == levels.len()))
            && (!l.contains('+') || *l == "+")
    })
}

pub fn is_shared(raw: &str) -> bool {
    raw.starts_with("$share/")
}
