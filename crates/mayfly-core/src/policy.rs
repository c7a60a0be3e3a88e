//! The authorization seam. Every `StartTask` and `IssueToken` is decided at
//! request time by a [`Policy`]; the broker never decides on its own.
//! [`RulePolicy`] is the built-in, configuration-driven implementation.

use std::fmt;
use std::time::Duration;

use crate::envelope::{Audience, Envelope, Intent, Scope, Scopes, TaskContext};
use crate::spiffe::{SpiffeId, SpiffeIdPattern};
use crate::task::Task;

/// A request to open a task, as policy sees it.
#[derive(Debug)]
pub struct StartTaskRequest<'a> {
    /// The caller.
    pub agent: &'a SpiffeId,
    /// What the task is for.
    pub intent: &'a Intent,
    /// Facts about the task.
    pub context: &'a TaskContext,
    /// Everything the task asks to be allowed.
    pub envelope: &'a Envelope,
}

/// A request for a token under a task, as policy sees it.
#[derive(Debug)]
pub struct IssueTokenRequest<'a> {
    /// The caller (the task's owner).
    pub agent: &'a SpiffeId,
    /// The task, with its intent and context.
    pub task: &'a Task,
    /// The token's audience.
    pub audience: &'a Audience,
    /// The token's scopes.
    pub scopes: &'a Scopes,
}

/// A request to sign a task-bound certificate, as policy sees it.
#[derive(Debug)]
pub struct SignCertificateRequest<'a> {
    /// The caller (the task's owner).
    pub agent: &'a SpiffeId,
    /// The task, with its intent and context.
    pub task: &'a Task,
}

/// What policy decided.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Decision {
    /// Allowed, within limits.
    Permit {
        /// The id of the rule or policy that allowed it.
        policy_id: String,
        /// The longest credential this permit allows, if it caps the TTL.
        max_ttl: Option<Duration>,
    },
    /// Refused.
    Deny {
        /// The id of the deciding rule, or `None` for the default deny.
        policy_id: Option<String>,
        /// What was not allowed (never policy text).
        reason: String,
    },
}

/// Decides what agents may get. Implementations must be pure functions of
/// their input and configuration, and cheap: they run on every request.
pub trait Policy: Send + Sync + fmt::Debug {
    /// May `req.agent` open a task with this envelope?
    fn decide_start_task(&self, req: &StartTaskRequest<'_>) -> Decision;
    /// May `req.agent` receive this token under `req.task`?
    fn decide_issue_token(&self, req: &IssueTokenRequest<'_>) -> Decision;
    /// May `req.agent` receive a certificate for `req.task`?
    fn decide_sign_certificate(&self, req: &SignCertificateRequest<'_>) -> Decision;
}

/// A pattern over audiences or scopes: exact text, or `prefix*` matching
/// every value that starts with `prefix` (`*` alone matches everything).
#[derive(Clone, PartialEq, Eq)]
pub struct Pattern {
    /// The text before `*`, or the whole text.
    text: String,
    /// Whether a trailing `*` was given.
    prefix: bool,
}

impl Pattern {
    /// Parses a pattern; `*` may appear only at the end.
    pub fn new(s: &str) -> Result<Self, String> {
        let (text, prefix) = match s.strip_suffix('*') {
            Some(t) => (t, true),
            None => (s, false),
        };
        if text.contains('*') {
            return Err(format!("pattern {s:?}: '*' is allowed only at the end"));
        }
        if !prefix && text.is_empty() {
            return Err("empty pattern".to_owned());
        }
        Ok(Self {
            text: text.to_owned(),
            prefix,
        })
    }

    /// Whether `value` matches.
    pub fn matches(&self, value: &str) -> bool {
        if self.prefix {
            value.starts_with(&self.text)
        } else {
            value == self.text
        }
    }
}

impl fmt::Debug for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Pattern({}{})",
            self.text,
            if self.prefix { "*" } else { "" }
        )
    }
}

/// One allow rule: these agents may use these audiences with these scopes.
#[derive(Debug, Clone)]
pub struct Rule {
    /// Named in decisions and the audit trail.
    pub id: String,
    /// Which agents the rule applies to.
    pub agents: Vec<SpiffeIdPattern>,
    /// Which audiences it allows.
    pub audiences: Vec<Pattern>,
    /// Which scopes it allows.
    pub scopes: Vec<Pattern>,
    /// The longest token it allows, if shorter than the broker's maximum.
    pub max_token_ttl: Option<Duration>,
    /// Whether the matched agents may have task certificates signed.
    pub certificates: bool,
    /// The longest certificate it allows, if shorter than the broker's maximum.
    pub max_certificate_ttl: Option<Duration>,
}

impl Rule {
    fn covers(&self, agent: &SpiffeId, audience: &Audience, scopes: &Scopes) -> bool {
        self.agents.iter().any(|p| p.matches(agent))
            && self.audiences.iter().any(|p| p.matches(audience.as_str()))
            && scopes.iter().all(|s| self.allows_scope(s))
    }

    fn allows_scope(&self, scope: &Scope) -> bool {
        self.scopes.iter().any(|p| p.matches(scope.as_str()))
    }
}

/// The built-in policy: an ordered list of allow rules; anything no rule
/// allows is denied. A request is permitted by the first rule that matches
/// the agent and covers every requested audience and every requested scope
/// on its own (rules do not combine), so a task's envelope is exactly as wide
/// as one rule allows.
#[derive(Debug, Clone, Default)]
pub struct RulePolicy {
    rules: Vec<Rule>,
}

impl RulePolicy {
    /// A policy from rules, in order.
    pub fn new(rules: Vec<Rule>) -> Self {
        Self { rules }
    }

    fn first_covering<'a, I>(
        &self,
        agent: &SpiffeId,
        audiences: I,
        scopes: &Scopes,
    ) -> Option<&Rule>
    where
        I: IntoIterator<Item = &'a Audience> + Clone,
    {
        self.rules.iter().find(|r| {
            audiences
                .clone()
                .into_iter()
                .all(|a| r.covers(agent, a, scopes))
        })
    }

    /// Names what no single rule allows, for the deny message.
    fn deny_reason<'a, I>(&self, agent: &SpiffeId, audiences: I, scopes: &Scopes) -> String
    where
        I: IntoIterator<Item = &'a Audience>,
    {
        let mine: Vec<&Rule> = self
            .rules
            .iter()
            .filter(|r| r.agents.iter().any(|p| p.matches(agent)))
            .collect();
        if mine.is_empty() {
            return format!("no rule allows agent {agent} anything");
        }
        for a in audiences {
            let for_aud: Vec<&&Rule> = mine
                .iter()
                .filter(|r| r.audiences.iter().any(|p| p.matches(a.as_str())))
                .collect();
            if for_aud.is_empty() {
                return format!("no rule allows agent {agent} audience {:?}", a.as_str());
            }
            if let Some(s) = scopes
                .iter()
                .find(|s| !for_aud.iter().any(|r| r.allows_scope(s)))
            {
                return format!(
                    "no rule allows agent {agent} scope {:?} for audience {:?}",
                    s.as_str(),
                    a.as_str()
                );
            }
        }
        format!("no single rule allows agent {agent} all of the requested audiences and scopes")
    }
}

impl Policy for RulePolicy {
    fn decide_start_task(&self, req: &StartTaskRequest<'_>) -> Decision {
        let auds = req.envelope.audiences();
        match self.first_covering(req.agent, auds, req.envelope.scopes()) {
            Some(rule) => Decision::Permit {
                policy_id: rule.id.clone(),
                max_ttl: None,
            },
            None => Decision::Deny {
                policy_id: None,
                reason: self.deny_reason(req.agent, auds, req.envelope.scopes()),
            },
        }
    }

    fn decide_sign_certificate(&self, req: &SignCertificateRequest<'_>) -> Decision {
        let rule = self
            .rules
            .iter()
            .find(|r| r.certificates && r.agents.iter().any(|p| p.matches(req.agent)));
        match rule {
            Some(rule) => Decision::Permit {
                policy_id: rule.id.clone(),
                max_ttl: rule.max_certificate_ttl,
            },
            None => Decision::Deny {
                policy_id: None,
                reason: format!("no rule allows agent {} certificates", req.agent),
            },
        }
    }

    fn decide_issue_token(&self, req: &IssueTokenRequest<'_>) -> Decision {
        let auds = std::iter::once(req.audience);
        match self.first_covering(req.agent, auds.clone(), req.scopes) {
            Some(rule) => Decision::Permit {
                policy_id: rule.id.clone(),
                max_ttl: rule.max_token_ttl,
            },
            None => Decision::Deny {
                policy_id: None,
                reason: self.deny_reason(req.agent, auds, req.scopes),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::parse_scopes;

    fn rule(id: &str, agents: &[&str], auds: &[&str], scopes: &[&str]) -> Rule {
        Rule {
            id: id.into(),
            agents: agents.iter().map(|a| a.parse().unwrap()).collect(),
            audiences: auds.iter().map(|a| Pattern::new(a).unwrap()).collect(),
            scopes: scopes.iter().map(|s| Pattern::new(s).unwrap()).collect(),
            max_token_ttl: Some(Duration::from_secs(60)),
            certificates: id == "r",
            max_certificate_ttl: None,
        }
    }

    fn start(policy: &RulePolicy, agent: &str, auds: &[&str], scopes: &[&str]) -> Decision {
        let agent = SpiffeId::new(agent).unwrap();
        let envelope = Envelope::new(auds, scopes).unwrap();
        policy.decide_start_task(&StartTaskRequest {
            agent: &agent,
            intent: &Intent::new("test").unwrap(),
            context: &TaskContext::default(),
            envelope: &envelope,
        })
    }

    #[test]
    fn patterns() {
        assert!(Pattern::new("read:*").unwrap().matches("read:files"));
        assert!(!Pattern::new("read:*").unwrap().matches("write:files"));
        assert!(Pattern::new("*").unwrap().matches("anything"));
        assert!(Pattern::new("api").unwrap().matches("api"));
        assert!(!Pattern::new("api").unwrap().matches("api2"));
        assert!(Pattern::new("a*b").is_err());
        assert!(Pattern::new("").is_err());
    }

    #[test]
    fn first_covering_rule_decides() {
        let p = RulePolicy::new(vec![
            rule(
                "readers",
                &["spiffe://td/agent/*"],
                &["https://api"],
                &["read:*"],
            ),
            rule(
                "mailer",
                &["spiffe://td/agent/mail"],
                &["https://mail"],
                &["send"],
            ),
        ]);
        assert_eq!(
            start(
                &p,
                "spiffe://td/agent/a",
                &["https://api"],
                &["read:x", "read:y"]
            ),
            Decision::Permit {
                policy_id: "readers".into(),
                max_ttl: None
            }
        );
        // Rules do not combine: one rule must cover the whole envelope.
        let Decision::Deny { reason, .. } = start(
            &p,
            "spiffe://td/agent/mail",
            &["https://api", "https://mail"],
            &[],
        ) else {
            panic!("expected deny")
        };
        assert!(reason.contains("no single rule"), "{reason}");
        let Decision::Deny { reason, .. } =
            start(&p, "spiffe://td/agent/a", &["https://api"], &["write:x"])
        else {
            panic!("expected deny")
        };
        assert_eq!(
            reason,
            "no rule allows agent spiffe://td/agent/a scope \"write:x\" for audience \"https://api\""
        );
        let Decision::Deny { reason, .. } = start(&p, "spiffe://td/other/a", &["https://api"], &[])
        else {
            panic!("expected deny")
        };
        assert!(reason.contains("anything"), "{reason}");
    }

    #[test]
    fn issue_token_carries_the_rule_ttl_cap() {
        let p = RulePolicy::new(vec![rule(
            "r",
            &["spiffe://td/agent/*"],
            &["api"],
            &["read"],
        )]);
        let agent = SpiffeId::new("spiffe://td/agent/a").unwrap();
        let task = Task {
            id: crate::TaskId::generate(),
            agent: agent.clone(),
            intent: Intent::new("x").unwrap(),
            context: TaskContext::default(),
            envelope: Envelope::new(&["api"], &["read"]).unwrap(),
            created_at: crate::Timestamp::from_secs(0),
            expires_at: crate::Timestamp::from_secs(10),
        };
        let aud = Audience::new("api").unwrap();
        let decision = p.decide_issue_token(&IssueTokenRequest {
            agent: &agent,
            task: &task,
            audience: &aud,
            scopes: &parse_scopes(&["read"]).unwrap(),
        });
        assert_eq!(
            decision,
            Decision::Permit {
                policy_id: "r".into(),
                max_ttl: Some(Duration::from_secs(60))
            }
        );
    }
}
