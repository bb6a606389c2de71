//! The principal of a connection authenticated by its TLS client certificate (the SSL
//! security protocol), from the certificate's subject through Kafka's
//! `ssl.principal.mapping.rules` (KIP-371), so the same rules give the same principal names in
//! ACLs as on a Kafka broker.
//!
//! Rules: a comma-separated list of `DEFAULT` (the distinguished name as it is) and
//! `RULE:pattern/replacement/[L|U]` (when `pattern` matches the whole name, the name with every
//! match replaced, `$1` naming a group, then lower- or upper-cased). The first rule that
//! applies names the principal; when none does, the connection is refused.

use regex::Regex;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RuleError {
    #[error("invalid rule '{0}': expected DEFAULT or RULE:pattern/replacement/[LU]")]
    Syntax(String),
    #[error("invalid pattern in rule '{rule}': {why}")]
    Pattern { rule: String, why: String },
}

#[derive(Debug, Clone)]
enum Rule {
    Default,
    Replace {
        whole: Regex,
        pattern: Regex,
        /// In the regex crate's syntax (`${1}`), converted from Java's (`$1`).
        replacement: String,
        case: Case,
    },
}

#[derive(Debug, Clone, Copy)]
enum Case {
    Keep,
    Lower,
    Upper,
}

/// Parsed `ssl.principal.mapping.rules`.
#[derive(Debug, Clone)]
pub struct PrincipalRules {
    rules: Vec<Rule>,
    text: String,
}

impl Default for PrincipalRules {
    fn default() -> Self {
        Self {
            rules: vec![Rule::Default],
            text: "DEFAULT".into(),
        }
    }
}

impl PrincipalRules {
    pub fn parse(text: &str) -> Result<Self, RuleError> {
        let mut rules = Vec::new();
        for raw in split_rules(text)? {
            if raw == "DEFAULT" {
                rules.push(Rule::Default);
                continue;
            }
            let body = raw
                .strip_prefix("RULE:")
                .ok_or_else(|| RuleError::Syntax(raw.clone()))?;
            let (pattern, rest) =
                take_until_slash(body).ok_or_else(|| RuleError::Syntax(raw.clone()))?;
            let (replacement, flags) =
                take_until_slash(rest).ok_or_else(|| RuleError::Syntax(raw.clone()))?;
            let case = match flags {
                "" => Case::Keep,
                "L" => Case::Lower,
                "U" => Case::Upper,
                _ => return Err(RuleError::Syntax(raw.clone())),
            };
            let compile = |p: &str| {
                Regex::new(p).map_err(|e| RuleError::Pattern {
                    rule: raw.clone(),
                    why: e.to_string(),
                })
            };
            rules.push(Rule::Replace {
                whole: compile(&format!("^(?:{pattern})$"))?,
                pattern: compile(pattern)?,
                replacement: java_replacement(replacement),
                case,
            });
        }
        if rules.is_empty() {
            return Err(RuleError::Syntax(text.to_string()));
        }
        Ok(Self {
            rules,
            text: text.to_string(),
        })
    }

    /// The principal name for a certificate subject; `None` when no rule applies.
    pub fn map(&self, subject: &str) -> Option<String> {
        self.rules.iter().find_map(|r| match r {
            Rule::Default => Some(subject.to_string()),
            Rule::Replace {
                whole,
                pattern,
                replacement,
                case,
            } => {
                if !whole.is_match(subject) {
                    return None;
                }
                let out = pattern
                    .replace_all(subject, replacement.as_str())
                    .into_owned();
                Some(match case {
                    Case::Keep => out,
                    Case::Lower => out.to_lowercase(),
                    Case::Upper => out.to_uppercase(),
                })
            }
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }
}

/// Splits at the commas between rules, not at those inside a rule's pattern or replacement
/// (a `RULE:` holds exactly two unescaped slashes before its flags).
fn split_rules(text: &str) -> Result<Vec<String>, RuleError> {
    let mut out = Vec::new();
    let mut rest = text.trim();
    while !rest.is_empty() {
        if let Some(after) = rest.strip_prefix("DEFAULT") {
            out.push("DEFAULT".to_string());
            rest = after.trim_start();
        } else if let Some(body) = rest.strip_prefix("RULE:") {
            let (_, after_pattern) =
                take_until_slash(body).ok_or_else(|| RuleError::Syntax(rest.to_string()))?;
            let (_, after_replacement) = take_until_slash(after_pattern)
                .ok_or_else(|| RuleError::Syntax(rest.to_string()))?;
            let flags_end = after_replacement
                .find(',')
                .unwrap_or(after_replacement.len());
            let consumed = rest.len() - after_replacement.len() + flags_end;
            out.push(rest[..consumed].trim_end().to_string());
            rest = rest[consumed..].trim_start();
        } else {
            return Err(RuleError::Syntax(rest.to_string()));
        }
        match rest.strip_prefix(',') {
            Some(after) => rest = after.trim_start(),
            None if rest.is_empty() => {}
            None => return Err(RuleError::Syntax(rest.to_string())),
        }
    }
    Ok(out)
}

/// (text up to the first slash not escaped by a backslash, text after it).
fn take_until_slash(s: &str) -> Option<(&str, &str)> {
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        match c {
            '\\' if !escaped => escaped = true,
            '/' if !escaped => return Some((&s[..i], &s[i + 1..])),
            _ => escaped = false,
        }
    }
    None
}

/// Java's `replaceAll` replacement (`$1` a group, `\x` a literal x) in the regex crate's syntax.
fn java_replacement(java: &str) -> String {
    let mut out = String::with_capacity(java.len() + 4);
    let mut chars = java.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some('$') => out.push_str("$$"),
                Some(other) => out.push(other),
                None => {}
            },
            '$' => {
                let mut digits = String::new();
                while let Some(d) = chars.peek().filter(|d| d.is_ascii_digit()) {
                    digits.push(*d);
                    chars.next();
                }
                if digits.is_empty() {
                    out.push_str("$$");
                } else {
                    out.push_str(&format!("${{{digits}}}"));
                }
            }
            other => out.push(other),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const DN: &str = "CN=alice,OU=eng,O=Acme\\, Inc.,C=US";

    #[test]
    fn default_keeps_the_distinguished_name() {
        assert_eq!(PrincipalRules::default().map(DN).as_deref(), Some(DN));
    }

    #[test]
    fn kafkas_documented_examples() {
        // From Kafka's security documentation (ssl.principal.mapping.rules).
        let rules = PrincipalRules::parse(
            "RULE:^CN=(.*?),OU=ServiceUsers.*$/$1/,RULE:^CN=(.*?),OU=(.*?),O=(.*?),L=(.*?),ST=(.*?),C=(.*?)$/$1@$2/L,RULE:^.*[Cc][Nn]=([a-zA-Z0-9.]*).*$/$1/U,DEFAULT",
        )
        .unwrap();
        assert_eq!(
            rules
                .map("CN=serviceuser,OU=ServiceUsers,O=Unknown,L=Unknown,ST=Unknown,C=Unknown")
                .as_deref(),
            Some("serviceuser")
        );
        assert_eq!(
            rules
                .map("CN=adminUser,OU=Admin,O=Unknown,L=Unknown,ST=Unknown,C=Unknown")
                .as_deref(),
            Some("adminuser@admin")
        );
        assert_eq!(rules.map("CN=otheruser,OU=x").as_deref(), Some("OTHERUSER"));
        assert_eq!(rules.map("O=nobody").as_deref(), Some("O=nobody"));
    }

    #[test]
    fn no_matching_rule_is_none_and_bad_rules_are_refused() {
        let only = PrincipalRules::parse("RULE:^CN=([a-z]+),.*$/$1/").unwrap();
        assert_eq!(only.map(DN).as_deref(), Some("alice"));
        assert_eq!(only.map("O=Acme"), None);
        assert!(PrincipalRules::parse("RULE:^CN=(.*)$/$1").is_err());
        assert!(PrincipalRules::parse("RULE:^CN=(.*)$/$1/X").is_err());
        assert!(PrincipalRules::parse("SOMETHING").is_err());
        assert!(PrincipalRules::parse("RULE:^CN=((.*$/$1/").is_err());
        assert!(PrincipalRules::parse("").is_err());
    }

    #[test]
    fn java_replacements_convert() {
        assert_eq!(java_replacement("$1@$2"), "${1}@${2}");
        assert_eq!(java_replacement("$1abc"), "${1}abc");
        assert_eq!(java_replacement("a\\$b"), "a$$b");
    }
}
