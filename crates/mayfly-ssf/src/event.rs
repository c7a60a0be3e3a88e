//! A revocation as the broker reports it, which streams want it, and the
//! Security Event Token (RFC 8417) it becomes for each.

use serde_json::{Value, json};

use crate::model::Stream;
use crate::{CREDENTIAL_CHANGE, SESSION_REVOKED, VERIFICATION};

/// What was revoked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    /// An access token for `audience`.
    Token {
        /// Its audience.
        audience: String,
    },
    /// A task certificate.
    Certificate {
        /// Its serial, hex.
        serial: String,
    },
    /// A database login in `database`.
    DatabaseLogin {
        /// The database's name (its logins' audience).
        database: String,
    },
}

/// One revocation of the broker's revocation log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revoked {
    /// Its position in the log: a stream's cursor.
    pub cursor: u64,
    /// The lease.
    pub lease_id: String,
    /// Its task.
    pub task_id: String,
    /// The agent whose task it is.
    pub agent: String,
    /// What was revoked.
    pub credential: Credential,
    /// When, seconds since the epoch.
    pub at: u64,
    /// Why (the revocation reason's name: `operator`, `task_completed`…).
    pub reason: String,
    /// Whether an operator (`admin`), the agent itself (`user`), policy or
    /// the broker (`system`) ended it, in CAEP's terms.
    pub initiating_entity: &'static str,
}

impl Revoked {
    /// The CAEP event it is.
    pub fn event_type(&self) -> &'static str {
        match self.credential {
            Credential::Token { .. } => SESSION_REVOKED,
            Credential::Certificate { .. } | Credential::DatabaseLogin { .. } => CREDENTIAL_CHANGE,
        }
    }

    /// The audience it was for, if any.
    fn audience(&self) -> Option<&str> {
        match &self.credential {
            Credential::Token { audience } => Some(audience),
            Credential::DatabaseLogin { database } => Some(database),
            Credential::Certificate { .. } => None,
        }
    }

    /// Whether `stream` carries it: asking for its event type, and
    /// holding its agent or its audience as a subject. (Whether the stream
    /// delivers now is its status's business.)
    pub fn wanted_by(&self, stream: &Stream) -> bool {
        stream
            .events_requested
            .iter()
            .any(|e| e == self.event_type())
            && stream
                .subjects
                .iter()
                .any(|s| *s == self.agent || Some(s.as_str()) == self.audience())
    }

    /// The SET's claims for `stream`, issued at `iat` by `issuer`. The
    /// `jti` is the stream's and the log position's, so a SET sent again
    /// (a retry, a poll before the ack) is the same SET.
    pub fn set(&self, stream: &Stream, issuer: &str, iat: u64) -> Set {
        let mut event = json!({
            "event_timestamp": self.at,
            "initiating_entity": self.initiating_entity,
            "reason_admin": {"en": self.reason},
        });
        match &self.credential {
            Credential::Token { .. } => {}
            Credential::Certificate { serial } => {
                event["credential_type"] = json!("x509");
                event["change_type"] = json!("revoke");
                event["x509_serial"] = json!(serial);
            }
            Credential::DatabaseLogin { database } => {
                event["credential_type"] = json!("password");
                event["change_type"] = json!("revoke");
                event["friendly_name"] = json!(format!("database login for {database}"));
            }
        }
        let jti = set_id(&stream.stream_id, self.cursor);
        let claims = json!({
            "iss": issuer.trim_end_matches('/'),
            "jti": jti,
            "iat": iat,
            "aud": stream.receiver,
            // SSF complex subject: the lease is the session, the agent the
            // user; `task` names the task the lease belonged to.
            "sub_id": {
                "format": "complex",
                "session": {"format": "opaque", "id": self.lease_id},
                "user": {"format": "uri", "uri": self.agent},
                "task": {"format": "opaque", "id": self.task_id},
            },
            "txn": self.lease_id,
            "events": {self.event_type(): event},
        });
        Set { jti, claims }
    }
}

/// A SET before it is signed.
#[derive(Debug, Clone, PartialEq)]
pub struct Set {
    /// Its `jti`.
    pub jti: String,
    /// Its claims.
    pub claims: Value,
}

/// The `jti` of the SET for log position `cursor` on `stream_id`.
pub fn set_id(stream_id: &str, cursor: u64) -> String {
    format!("{stream_id}.{cursor}")
}

/// The log position a `jti` of `stream_id` names, if it is one of its SETs.
pub fn cursor_of(stream_id: &str, jti: &str) -> Option<u64> {
    jti.strip_prefix(stream_id)?.strip_prefix('.')?.parse().ok()
}

/// The verification SET a receiver asked for, with its `state`; `nonce`
/// makes its `jti` unique.
pub fn verification_set(
    stream: &Stream,
    issuer: &str,
    iat: u64,
    state: Option<&str>,
    nonce: &str,
) -> Set {
    let jti = format!("{}.verify.{nonce}", stream.stream_id);
    let mut event = json!({});
    if let Some(s) = state {
        event["state"] = json!(s);
    }
    let claims = json!({
        "iss": issuer.trim_end_matches('/'),
        "jti": jti,
        "iat": iat,
        "aud": stream.receiver,
        "sub_id": {"format": "opaque", "id": stream.stream_id},
        "events": {VERIFICATION: event},
    });
    Set { jti, claims }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::model::NewStream;

    fn stream(subjects: &[&str], events: &[&str]) -> Stream {
        let mut s = Stream::new(
            "st".into(),
            "spiffe://td/receiver".into(),
            NewStream::parse(
                &json!({"delivery": {"method": crate::POLL},
                "events_requested": events}),
                &crate::model::PushPolicy::default(),
            )
            .unwrap(),
        );
        s.subjects = subjects.iter().map(|s| (*s).to_owned()).collect();
        s
    }

    fn token() -> Revoked {
        Revoked {
            cursor: 42,
            lease_id: "L1".into(),
            task_id: "T1".into(),
            agent: "spiffe://td/agent/a".into(),
            credential: Credential::Token {
                audience: "https://api.example.com".into(),
            },
            at: 1_800_000_000,
            reason: "operator".into(),
            initiating_entity: "admin",
        }
    }

    #[test]
    fn a_stream_gets_the_events_of_its_agents_and_audiences_only() {
        let t = token();
        let both = [SESSION_REVOKED, CREDENTIAL_CHANGE];
        assert!(t.wanted_by(&stream(&["spiffe://td/agent/a"], &both)));
        assert!(t.wanted_by(&stream(&["https://api.example.com"], &both)));
        assert!(!t.wanted_by(&stream(&["spiffe://td/agent/b"], &both)));
        assert!(!t.wanted_by(&stream(&[], &both)));
        // Not the event type it asked for.
        assert!(!t.wanted_by(&stream(&["spiffe://td/agent/a"], &[CREDENTIAL_CHANGE])));
        // A certificate has no audience: only its agent's streams.
        let cert = Revoked {
            credential: Credential::Certificate {
                serial: "5A".into(),
            },
            ..t
        };
        assert!(!cert.wanted_by(&stream(&["https://api.example.com"], &both)));
        assert!(cert.wanted_by(&stream(&["spiffe://td/agent/a"], &both)));
    }

    #[test]
    fn the_set_names_lease_task_and_agent_and_is_the_same_when_sent_again() {
        let s = stream(&["spiffe://td/agent/a"], &[SESSION_REVOKED]);
        let set = token().set(&s, "https://broker.example/", 7);
        assert_eq!(set, token().set(&s, "https://broker.example", 7));
        let c = &set.claims;
        assert_eq!(c["iss"], "https://broker.example");
        assert_eq!(c["aud"], "spiffe://td/receiver");
        assert_eq!(c["sub_id"]["session"]["id"], "L1");
        assert_eq!(c["sub_id"]["task"]["id"], "T1");
        assert_eq!(c["sub_id"]["user"]["uri"], "spiffe://td/agent/a");
        assert_eq!(
            c["events"][SESSION_REVOKED]["event_timestamp"],
            1_800_000_000
        );
        assert_eq!(cursor_of("st", &set.jti), Some(42));
        assert_eq!(cursor_of("st2", &set.jti), None);
        assert_eq!(cursor_of("st", "st.verify.x"), None);

        let login = Revoked {
            credential: Credential::DatabaseLogin {
                database: "postgres://orders".into(),
            },
            ..token()
        };
        let c = login.set(&s, "https://broker.example", 7).claims;
        let e = &c["events"][CREDENTIAL_CHANGE];
        assert_eq!(e["change_type"], "revoke");
        assert_eq!(e["credential_type"], "password");
    }
}
