//! What a task asks for: audiences, scopes, intent and context, each parsed
//! into a type that is valid by construction and within hard size limits.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::newtype::validated_string;

pub use crate::limits::{
    MAX_AUDIENCE_BYTES, MAX_AUDIENCES, MAX_CONTEXT_ENTRIES, MAX_CONTEXT_KEY_BYTES,
    MAX_CONTEXT_VALUE_BYTES, MAX_INTENT_BYTES, MAX_SCOPE_BYTES, MAX_SCOPES,
};

/// What is wrong with a request field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ValidationError {
    /// The intent is empty or only white space.
    #[error("intent is empty: say what the task is for")]
    EmptyIntent,
    /// The intent is longer than [`MAX_INTENT_BYTES`].
    #[error("intent is {0} bytes; at most {MAX_INTENT_BYTES} are allowed")]
    IntentTooLong(usize),
    /// The intent has control characters other than tab and newline.
    #[error("intent contains control characters")]
    IntentControlChar,
    /// More than [`MAX_CONTEXT_ENTRIES`] context entries.
    #[error("context has {0} entries; at most {MAX_CONTEXT_ENTRIES} are allowed")]
    TooManyContextEntries(usize),
    /// A context key is empty, too long or has characters outside `[A-Za-z0-9_.-]`.
    #[error(
        "context key {0} is invalid: use 1 to {MAX_CONTEXT_KEY_BYTES} characters from A-Z a-z 0-9 _ . -"
    )]
    BadContextKey(String),
    /// An `UpdateTaskContext` names more keys to set or remove than a
    /// context may hold.
    #[error("{field} has {count} keys; at most {MAX_CONTEXT_ENTRIES} are allowed")]
    TooManyContextKeys {
        /// `set` or `remove`.
        field: &'static str,
        /// How many were sent.
        count: usize,
    },
    /// A key is both set and removed in one change.
    #[error("context key {0} is both set and removed; say one")]
    SetAndRemoved(String),
    /// A context value is too long or has control characters.
    #[error(
        "context value for {0} is invalid: at most {MAX_CONTEXT_VALUE_BYTES} bytes, no control characters"
    )]
    BadContextValue(String),
    /// The envelope names no audience.
    #[error("a task needs at least one audience")]
    NoAudiences,
    /// More than [`MAX_AUDIENCES`] audiences.
    #[error("{0} audiences requested; at most {MAX_AUDIENCES} are allowed")]
    TooManyAudiences(usize),
    /// An audience is empty.
    #[error("audience is empty")]
    EmptyAudience,
    /// An audience is too long or has white space or control characters.
    #[error(
        "audience {0} is invalid: 1 to {MAX_AUDIENCE_BYTES} printable ASCII characters, no spaces"
    )]
    BadAudience(String),
    /// More than [`MAX_SCOPES`] scopes.
    #[error("{0} scopes requested; at most {MAX_SCOPES} are allowed")]
    TooManyScopes(usize),
    /// A scope is empty.
    #[error("scope is empty")]
    EmptyScope,
    /// A scope is not an RFC 6749 scope-token.
    #[error(
        "scope {0} is invalid: 1 to {MAX_SCOPE_BYTES} printable ASCII characters without spaces, '\"' or '\\'"
    )]
    BadScope(String),
}

/// Quotes untrusted input for an error message: escaped and cut short.
pub(crate) fn quote(s: &str) -> String {
    let cut: String = s.chars().take(64).collect();
    if cut.len() < s.len() {
        format!("{cut:?}…")
    } else {
        format!("{cut:?}")
    }
}

fn check_audience(s: &str) -> Result<(), ValidationError> {
    if s.is_empty() {
        return Err(ValidationError::EmptyAudience);
    }
    if s.len() > MAX_AUDIENCE_BYTES || !s.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ValidationError::BadAudience(quote(s)));
    }
    Ok(())
}

fn check_scope(s: &str) -> Result<(), ValidationError> {
    if s.is_empty() {
        return Err(ValidationError::EmptyScope);
    }
    // RFC 6749 section 3.3: scope-token = 1*( %x21 / %x23-5B / %x5D-7E )
    let ok = |b: u8| b == 0x21 || (0x23..=0x5B).contains(&b) || (0x5D..=0x7E).contains(&b);
    if s.len() > MAX_SCOPE_BYTES || !s.bytes().all(ok) {
        return Err(ValidationError::BadScope(quote(s)));
    }
    Ok(())
}

validated_string!(
    /// A token audience: the downstream API a token is for (`aud`).
    Audience,
    check_audience,
    ValidationError
);
validated_string!(
    /// An OAuth scope-token (RFC 6749 section 3.3).
    Scope,
    check_scope,
    ValidationError
);

/// A set of scopes, sorted and without duplicates.
pub type Scopes = BTreeSet<Scope>;

/// Parses a list of scopes into a set (duplicates fold).
pub fn parse_scopes<S: AsRef<str>>(raw: &[S]) -> Result<Scopes, ValidationError> {
    if raw.len() > MAX_SCOPES {
        return Err(ValidationError::TooManyScopes(raw.len()));
    }
    raw.iter().map(|s| Scope::new(s.as_ref())).collect()
}

/// Joins scopes with single spaces, as the `scope` claim.
pub fn scope_string(scopes: &Scopes) -> String {
    let mut out = String::new();
    for (i, s) in scopes.iter().enumerate() {
        if i > 0 {
            out.push(' ');
        }
        out.push_str(s.as_str());
    }
    out
}

/// The most a task may ever receive: audiences and scopes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// At least one audience.
    audiences: BTreeSet<Audience>,
    /// May be empty (tokens without scopes).
    scopes: Scopes,
}

impl Envelope {
    /// Parses the audiences and scopes a task asks for.
    pub fn new<A: AsRef<str>, S: AsRef<str>>(
        audiences: &[A],
        scopes: &[S],
    ) -> Result<Self, ValidationError> {
        if audiences.is_empty() {
            return Err(ValidationError::NoAudiences);
        }
        if audiences.len() > MAX_AUDIENCES {
            return Err(ValidationError::TooManyAudiences(audiences.len()));
        }
        let audiences = audiences
            .iter()
            .map(|a| Audience::new(a.as_ref()))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            audiences,
            scopes: parse_scopes(scopes)?,
        })
    }

    /// The audiences.
    pub fn audiences(&self) -> &BTreeSet<Audience> {
        &self.audiences
    }

    /// The scopes.
    pub fn scopes(&self) -> &Scopes {
        &self.scopes
    }

    /// What of (`audience`, `scopes`) lies outside this envelope, if anything.
    pub fn excess(&self, audience: &Audience, scopes: &Scopes) -> Option<EnvelopeExcess> {
        let audience_outside = !self.audiences.contains(audience);
        let scopes_outside: Vec<Scope> = scopes.difference(&self.scopes).cloned().collect();
        (audience_outside || !scopes_outside.is_empty()).then(|| EnvelopeExcess {
            audience: audience_outside.then(|| audience.clone()),
            scopes: scopes_outside,
        })
    }
}

/// The part of a request that lies outside a task's envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvelopeExcess {
    /// The audience, if it is not in the envelope.
    pub audience: Option<Audience>,
    /// The scopes not in the envelope.
    pub scopes: Vec<Scope>,
}

impl fmt::Display for EnvelopeExcess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if let Some(a) = &self.audience {
            parts.push(format!("audience {:?}", a.as_str()));
        }
        if !self.scopes.is_empty() {
            let names: Vec<&str> = self.scopes.iter().map(Scope::as_str).collect();
            parts.push(format!("scopes {names:?}"));
        }
        write!(f, "{} outside the task's envelope", parts.join(" and "))
    }
}

/// What the agent says the task is for. Shown to operators and policy; never
/// placed in a token.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Intent(String);

impl Intent {
    /// Validates an intent.
    pub fn new(s: &str) -> Result<Self, ValidationError> {
        if s.trim().is_empty() {
            return Err(ValidationError::EmptyIntent);
        }
        if s.len() > MAX_INTENT_BYTES {
            return Err(ValidationError::IntentTooLong(s.len()));
        }
        if s.chars().any(|c| c.is_control() && c != '\n' && c != '\t') {
            return Err(ValidationError::IntentControlChar);
        }
        Ok(Self(s.to_owned()))
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Intent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Intent({:?})", self.0)
    }
}

/// Checks a context key: 1 to [`MAX_CONTEXT_KEY_BYTES`] characters from
/// `A-Z a-z 0-9 _ . -`.
pub fn check_context_key(k: &str) -> Result<(), ValidationError> {
    let ok = !k.is_empty()
        && k.len() <= MAX_CONTEXT_KEY_BYTES
        && k.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(ValidationError::BadContextKey(quote(k)))
    }
}

/// One change to a task's context, as `UpdateTaskContext` asks for it:
/// entries to set and keys to remove, each within the bounds of a context,
/// no key in both.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContextChange {
    /// Entries that replace (or add to) the task's.
    set: TaskContext,
    /// Keys that go.
    remove: BTreeSet<String>,
}

impl ContextChange {
    /// Validates a change.
    pub fn new<I, K, V, R>(set: I, remove: &[R]) -> Result<Self, ValidationError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<str>,
        V: AsRef<str>,
        R: AsRef<str>,
    {
        let set = TaskContext::new(set).map_err(|e| match e {
            ValidationError::TooManyContextEntries(count) => ValidationError::TooManyContextKeys {
                field: "set",
                count,
            },
            other => other,
        })?;
        if remove.len() > MAX_CONTEXT_ENTRIES {
            return Err(ValidationError::TooManyContextKeys {
                field: "remove",
                count: remove.len(),
            });
        }
        let mut keys = BTreeSet::new();
        for k in remove {
            let k = k.as_ref();
            check_context_key(k)?;
            if set.get(k).is_some() {
                return Err(ValidationError::SetAndRemoved(quote(k)));
            }
            keys.insert(k.to_owned());
        }
        Ok(Self { set, remove: keys })
    }

    /// `context` with this change applied (bounded again as a whole).
    pub fn apply(&self, context: &TaskContext) -> Result<TaskContext, ValidationError> {
        let mut entries = context.entries().clone();
        for k in &self.remove {
            entries.remove(k);
        }
        entries.extend(self.set.entries().clone());
        TaskContext::new(entries)
    }

    /// Every key the change names, set ones first (for the audit record).
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.set
            .entries()
            .keys()
            .chain(self.remove.iter())
            .map(String::as_str)
    }
}

/// The facts about a task that policy decides on, e.g. `environment`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TaskContext(BTreeMap<String, String>);

impl TaskContext {
    /// Validates context entries.
    pub fn new<I, K, V>(entries: I) -> Result<Self, ValidationError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<str>,
        V: AsRef<str>,
    {
        let mut map = BTreeMap::new();
        for (k, v) in entries {
            let (k, v) = (k.as_ref(), v.as_ref());
            check_context_key(k)?;
            if v.len() > MAX_CONTEXT_VALUE_BYTES || v.chars().any(char::is_control) {
                return Err(ValidationError::BadContextValue(quote(k)));
            }
            map.insert(k.to_owned(), v.to_owned());
            if map.len() > MAX_CONTEXT_ENTRIES {
                return Err(ValidationError::TooManyContextEntries(map.len()));
            }
        }
        Ok(Self(map))
    }

    /// The entries, sorted by key.
    pub fn entries(&self) -> &BTreeMap<String, String> {
        &self.0
    }

    /// One entry.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scopes(s: &[&str]) -> Scopes {
        parse_scopes(s).unwrap()
    }

    #[test]
    fn scopes_follow_rfc6749() {
        assert!(Scope::new("read:files").is_ok());
        assert!(Scope::new("a!#[]~").is_ok());
        for bad in [
            "",
            "two words",
            "quote\"",
            "back\\slash",
            "tab\t",
            "nl\n",
            "é",
        ] {
            assert!(Scope::new(bad).is_err(), "{bad:?}");
        }
        assert!(Scope::new(&"s".repeat(MAX_SCOPE_BYTES + 1)).is_err());
        let many: Vec<String> = (0..=MAX_SCOPES).map(|i| format!("s{i}")).collect();
        assert_eq!(parse_scopes(&many), Err(ValidationError::TooManyScopes(65)));
        assert_eq!(scope_string(&scopes(&["b", "a", "b"])), "a b");
    }

    #[test]
    fn envelope_needs_an_audience_and_reports_excess() {
        let none: [&str; 0] = [];
        assert_eq!(
            Envelope::new(&none, &["read"]),
            Err(ValidationError::NoAudiences)
        );
        assert_eq!(
            Envelope::new(&[""], &none),
            Err(ValidationError::EmptyAudience)
        );
        assert!(matches!(
            Envelope::new(&["has space"], &none),
            Err(ValidationError::BadAudience(_))
        ));
        let env = Envelope::new(&["api", "db"], &["read", "write"]).unwrap();
        let api = Audience::new("api").unwrap();
        assert_eq!(env.excess(&api, &scopes(&["read"])), None);
        let excess = env
            .excess(&Audience::new("mail").unwrap(), &scopes(&["read", "admin"]))
            .unwrap();
        assert_eq!(
            excess.to_string(),
            "audience \"mail\" and scopes [\"admin\"] outside the task's envelope"
        );
    }

    #[test]
    fn intent_and_context_limits() {
        assert_eq!(Intent::new("  "), Err(ValidationError::EmptyIntent));
        assert!(Intent::new("summarise\nthe ticket").is_ok());
        assert_eq!(
            Intent::new("a\u{7}b"),
            Err(ValidationError::IntentControlChar)
        );
        assert_eq!(
            Intent::new(&"x".repeat(MAX_INTENT_BYTES + 1)),
            Err(ValidationError::IntentTooLong(MAX_INTENT_BYTES + 1))
        );
        assert!(Intent::new(&"x".repeat(MAX_INTENT_BYTES)).is_ok());

        assert!(TaskContext::new([("environment", "prod")]).is_ok());
        let too_many: Vec<(String, String)> = (0..=MAX_CONTEXT_ENTRIES)
            .map(|i| (format!("k{i}"), "v".into()))
            .collect();
        assert_eq!(
            TaskContext::new(too_many),
            Err(ValidationError::TooManyContextEntries(65))
        );
        assert!(matches!(
            TaskContext::new([("bad key", "v")]),
            Err(ValidationError::BadContextKey(_))
        ));
        assert!(matches!(
            TaskContext::new([("k", "v\u{0}")]),
            Err(ValidationError::BadContextValue(_))
        ));
    }

    #[test]
    fn quote_escapes_and_truncates() {
        assert_eq!(quote("a\nb"), "\"a\\nb\"");
        assert!(quote(&"x".repeat(100)).ends_with('…'));
    }
}
