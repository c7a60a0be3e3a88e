//! SPIFFE IDs and trust domains, parsed once at the edge into types that are
//! always valid (SPIFFE-ID standard, section 2).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::limits::MAX_SPIFFE_ID_BYTES as MAX_SPIFFE_ID_LEN;
/// The longest trust domain name the standard allows, in bytes.
const MAX_TRUST_DOMAIN_LEN: usize = 255;
/// The path segment Mayfly reserves for task certificates: the SPIFFE ID of
/// a task certificate is `<agent>/task/<task_id>`. No workload identity
/// that Mayfly accepts as a caller may contain it.
pub const TASK_SEGMENT: &str = "task";

/// Why a string is not a SPIFFE ID or trust domain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SpiffeIdError {
    /// The string is empty.
    #[error("SPIFFE ID is empty")]
    Empty,
    /// The string does not start with `spiffe://`.
    #[error("SPIFFE ID must start with \"spiffe://\"")]
    WrongScheme,
    /// The trust domain part is missing.
    #[error("SPIFFE ID has no trust domain")]
    MissingTrustDomain,
    /// The trust domain has a character outside `[a-z0-9._-]`.
    #[error("trust domain may contain only lowercase letters, digits, '.', '-' and '_'")]
    BadTrustDomainChar,
    /// A path segment has a character outside `[A-Za-z0-9._-]`.
    #[error("path segment may contain only letters, digits, '.', '-' and '_'")]
    BadPathChar,
    /// `//` in the path.
    #[error("SPIFFE ID path has an empty segment")]
    EmptySegment,
    /// A `.` or `..` segment.
    #[error("SPIFFE ID path has a '.' or '..' segment")]
    DotSegment,
    /// The path ends in `/`.
    #[error("SPIFFE ID path ends with '/'")]
    TrailingSlash,
    /// Longer than the standard allows.
    #[error("SPIFFE ID or trust domain is too long")]
    TooLong,
}

/// A SPIFFE trust domain such as `example.org`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(String);

impl TrustDomain {
    /// Parses a bare trust domain name (`example.org`) or a `spiffe://example.org` URI.
    pub fn new(s: &str) -> Result<Self, SpiffeIdError> {
        let name = s.strip_prefix("spiffe://").unwrap_or(s);
        if name.is_empty() {
            return Err(SpiffeIdError::MissingTrustDomain);
        }
        if name.len() > MAX_TRUST_DOMAIN_LEN {
            return Err(SpiffeIdError::TooLong);
        }
        if !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        {
            return Err(SpiffeIdError::BadTrustDomainChar);
        }
        Ok(Self(name.to_owned()))
    }

    /// The bare name, e.g. `example.org`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The trust domain's own SPIFFE ID, `spiffe://example.org`.
    pub fn id_string(&self) -> String {
        format!("spiffe://{}", self.0)
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TrustDomain({})", self.0)
    }
}

impl FromStr for TrustDomain {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl<'de> Deserialize<'de> for TrustDomain {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::new(&s).map_err(serde::de::Error::custom)
    }
}

impl Serialize for TrustDomain {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

/// A workload identity: `spiffe://<trust domain>/<path>`. Always valid; the
/// path is non-empty (an ID without a path names a trust domain, not a
/// workload).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    /// The whole ID, kept so `as_str` and `Display` cost nothing.
    id: String,
    /// Byte offset of the path (the first `/` after the trust domain).
    path_start: usize,
}

impl SpiffeId {
    /// Parses and validates a workload SPIFFE ID.
    pub fn new(s: &str) -> Result<Self, SpiffeIdError> {
        if s.is_empty() {
            return Err(SpiffeIdError::Empty);
        }
        if s.len() > MAX_SPIFFE_ID_LEN {
            return Err(SpiffeIdError::TooLong);
        }
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or(SpiffeIdError::WrongScheme)?;
        let (td, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        TrustDomain::new(td)?;
        if path.is_empty() {
            return Err(SpiffeIdError::EmptySegment);
        }
        validate_path(path)?;
        Ok(Self {
            id: s.to_owned(),
            path_start: "spiffe://".len() + td.len(),
        })
    }

    /// The whole ID.
    pub fn as_str(&self) -> &str {
        &self.id
    }

    /// The trust domain name, e.g. `example.org`.
    pub fn trust_domain_name(&self) -> &str {
        &self.id["spiffe://".len()..self.path_start]
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> TrustDomain {
        TrustDomain(self.trust_domain_name().to_owned())
    }

    /// The path, starting with `/`.
    pub fn path(&self) -> &str {
        &self.id[self.path_start..]
    }

    /// Whether this ID belongs to `td`.
    pub fn is_member_of(&self, td: &TrustDomain) -> bool {
        self.trust_domain_name() == td.as_str()
    }

    /// The path's segments, in order (`/agent/demo` → `agent`, `demo`).
    pub fn segments(&self) -> impl Iterator<Item = &str> {
        self.path()[1..].split('/')
    }

    /// Whether the path has the segment reserved for task certificates
    /// ([`TASK_SEGMENT`]) anywhere: such an ID names a task credential,
    /// never a caller.
    pub fn is_task_bound(&self) -> bool {
        self.segments().any(|s| s == TASK_SEGMENT)
    }

    /// Every strict path prefix of this ID as a SPIFFE ID string, shortest
    /// first, starting with the trust domain's own ID:
    /// `spiffe://td/a/b/c` → `spiffe://td`, `spiffe://td/a`,
    /// `spiffe://td/a/b`. Segment-exact: `spiffe://td/agent` is a prefix
    /// of `spiffe://td/agent/x` but not of `spiffe://td/agents/x`.
    pub fn ancestors(&self) -> impl Iterator<Item = &str> {
        let id = self.id.as_str();
        let path = &id[self.path_start..];
        std::iter::once(self.path_start)
            .chain(
                path.match_indices('/')
                    .skip(1)
                    .map(move |(i, _)| self.path_start + i),
            )
            .map(move |end| &id[..end])
    }

    /// This ID with more path segments appended (each validated), e.g. the
    /// task-bound ID `<id>/task/<task_id>`.
    pub fn join(&self, segments: &[&str]) -> Result<Self, SpiffeIdError> {
        let mut s = self.id.clone();
        for seg in segments {
            s.push('/');
            s.push_str(seg);
        }
        Self::new(&s)
    }
}

fn validate_path(path: &str) -> Result<(), SpiffeIdError> {
    if path.ends_with('/') {
        return Err(SpiffeIdError::TrailingSlash);
    }
    for seg in path[1..].split('/') {
        if seg.is_empty() {
            return Err(SpiffeIdError::EmptySegment);
        }
        if seg == "." || seg == ".." {
            return Err(SpiffeIdError::DotSegment);
        }
        if !seg
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        {
            return Err(SpiffeIdError::BadPathChar);
        }
    }
    Ok(())
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.id)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeId({})", self.id)
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl Serialize for SpiffeId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.id)
    }
}

impl<'de> Deserialize<'de> for SpiffeId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::new(&s).map_err(serde::de::Error::custom)
    }
}

/// A pattern over SPIFFE IDs from configuration: an exact ID, or
/// `spiffe://td/some/prefix/*`, which matches every ID strictly below
/// `spiffe://td/some/prefix`.
#[derive(Clone, PartialEq, Eq)]
pub struct SpiffeIdPattern {
    /// For a prefix pattern, the text before `*` (ending in `/`); for an
    /// exact pattern, the whole ID.
    text: String,
    /// Whether this is a `prefix/*` pattern.
    prefix: bool,
}

impl SpiffeIdPattern {
    /// Parses `spiffe://td/path` or `spiffe://td/path/*`.
    pub fn new(s: &str) -> Result<Self, SpiffeIdError> {
        match s.strip_suffix("/*") {
            Some(base) => {
                // `spiffe://td/*` (every workload of the domain) is allowed.
                if let Some(td) = base.strip_prefix("spiffe://")
                    && !td.contains('/')
                {
                    TrustDomain::new(td)?;
                } else {
                    SpiffeId::new(base)?;
                }
                Ok(Self {
                    text: format!("{base}/"),
                    prefix: true,
                })
            }
            None => Ok(Self {
                text: SpiffeId::new(s)?.id,
                prefix: false,
            }),
        }
    }

    /// Whether `id` matches.
    pub fn matches(&self, id: &SpiffeId) -> bool {
        if self.prefix {
            id.as_str().starts_with(&self.text)
        } else {
            id.as_str() == self.text
        }
    }
}

impl fmt::Display for SpiffeIdPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.prefix {
            write!(f, "{}*", self.text)
        } else {
            f.write_str(&self.text)
        }
    }
}

impl fmt::Debug for SpiffeIdPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeIdPattern({self})")
    }
}

impl FromStr for SpiffeIdPattern {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl<'de> Deserialize<'de> for SpiffeIdPattern {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::new(&s).map_err(serde::de::Error::custom)
    }
}

impl Serialize for SpiffeIdPattern {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_valid_ids() {
        let id = SpiffeId::new("spiffe://example.org/agent/demo").unwrap();
        assert_eq!(id.trust_domain_name(), "example.org");
        assert_eq!(id.path(), "/agent/demo");
        assert_eq!(id.to_string(), "spiffe://example.org/agent/demo");
        assert_eq!(id.as_str().parse::<SpiffeId>().unwrap(), id);
    }

    #[test]
    fn rejects_invalid_ids() {
        use SpiffeIdError::*;
        let cases = [
            ("", Empty),
            ("https://example.org/a", WrongScheme),
            ("SPIFFE://example.org/a", WrongScheme),
            ("spiffe://", MissingTrustDomain),
            ("spiffe:///a", MissingTrustDomain),
            ("spiffe://Example.org/a", BadTrustDomainChar),
            ("spiffe://ex:8080/a", BadTrustDomainChar),
            ("spiffe://user@ex/a", BadTrustDomainChar),
            ("spiffe://example.org", EmptySegment),
            ("spiffe://example.org/", TrailingSlash),
            ("spiffe://example.org/a/", TrailingSlash),
            ("spiffe://example.org/a//b", EmptySegment),
            ("spiffe://example.org/a/./b", DotSegment),
            ("spiffe://example.org/a/..", DotSegment),
            ("spiffe://example.org/a b", BadPathChar),
            ("spiffe://example.org/a?x=1", BadPathChar),
            ("spiffe://example.org/a#f", BadPathChar),
            ("spiffe://example.org/%41", BadPathChar),
        ];
        for (input, want) in cases {
            assert_eq!(SpiffeId::new(input), Err(want), "{input:?}");
        }
        let long = format!("spiffe://example.org/{}", "a".repeat(2048));
        assert_eq!(SpiffeId::new(&long), Err(TooLong));
    }

    #[test]
    fn membership_and_join() {
        let td = TrustDomain::new("example.org").unwrap();
        let other = TrustDomain::new("spiffe://other.org").unwrap();
        let id = SpiffeId::new("spiffe://example.org/agent/demo").unwrap();
        assert!(id.is_member_of(&td));
        assert!(!id.is_member_of(&other));
        // A trust domain whose name is a prefix of another's is not a member.
        let id2 = SpiffeId::new("spiffe://example.org.evil/agent").unwrap();
        assert!(!id2.is_member_of(&td));
        let joined = id.join(&["task", "abc_DEF-1"]).unwrap();
        assert_eq!(
            joined.as_str(),
            "spiffe://example.org/agent/demo/task/abc_DEF-1"
        );
        assert!(id.join(&["a/b/.."]).is_err());
    }

    #[test]
    fn task_segments_and_ancestors() {
        let task = SpiffeId::new("spiffe://td/agent/demo/task/abc").unwrap();
        assert!(task.is_task_bound());
        // Anywhere in the path, and only as a whole segment.
        assert!(SpiffeId::new("spiffe://td/task").unwrap().is_task_bound());
        assert!(
            SpiffeId::new("spiffe://td/a/task/b/task/c")
                .unwrap()
                .is_task_bound()
        );
        for id in [
            "spiffe://td/agent/demo",
            "spiffe://td/tasks/a",
            "spiffe://td/a/mytask",
        ] {
            assert!(!SpiffeId::new(id).unwrap().is_task_bound(), "{id}");
        }
        assert_eq!(
            task.segments().collect::<Vec<_>>(),
            ["agent", "demo", "task", "abc"]
        );
        let id = SpiffeId::new("spiffe://td/agent/demo/x").unwrap();
        assert_eq!(
            id.ancestors().collect::<Vec<_>>(),
            ["spiffe://td", "spiffe://td/agent", "spiffe://td/agent/demo"]
        );
        let top = SpiffeId::new("spiffe://td/a").unwrap();
        assert_eq!(top.ancestors().collect::<Vec<_>>(), ["spiffe://td"]);
    }

    #[test]
    fn patterns() {
        let exact = SpiffeIdPattern::new("spiffe://td/operator/admin").unwrap();
        let prefix = SpiffeIdPattern::new("spiffe://td/operator/*").unwrap();
        let all = SpiffeIdPattern::new("spiffe://td/*").unwrap();
        let admin = SpiffeId::new("spiffe://td/operator/admin").unwrap();
        let bob = SpiffeId::new("spiffe://td/operator/bob").unwrap();
        let op = SpiffeId::new("spiffe://td/operator").unwrap();
        let sneaky = SpiffeId::new("spiffe://td/operators/eve").unwrap();
        let foreign = SpiffeId::new("spiffe://td2/operator/admin").unwrap();
        assert!(exact.matches(&admin) && !exact.matches(&bob));
        assert!(prefix.matches(&admin) && prefix.matches(&bob));
        assert!(!prefix.matches(&op) && !prefix.matches(&sneaky));
        assert!(all.matches(&admin) && !all.matches(&foreign));
        assert_eq!(prefix.to_string(), "spiffe://td/operator/*");
        assert!(SpiffeIdPattern::new("spiffe://td/op*").is_err());
        assert!(SpiffeIdPattern::new("spiffe://TD/*").is_err());
    }
}
