//! Policy as code with Cedar. Mayfly ships a schema ([`SCHEMA`]); policies
//! are loaded from `*.cedar` files, validated against it (strict mode), and
//! decide every request at request time from who the agent is, what the task
//! intends, its current context, the scopes and lifetime asked for, and the
//! time.
//!
//! Annotations on policies:
//! - `@id("…")` (required): named in decisions, errors and the audit trail.
//! - `@max_ttl("10m")` on a permit: caps the lifetime of what it allows.
//! - `@approval("required")` on a permit: an operator must approve first.
//! - `@description("…")`: free text.
//!
//! When several permits apply, the shortest `max_ttl` wins and approval is
//! required if any of them requires it. Any forbid wins over every permit;
//! a policy that fails to evaluate denies (fail closed).

#![forbid(unsafe_code)]

mod cache;
mod load;
mod slice;
mod tools;

use std::collections::{BTreeSet, HashMap};
use std::str::FromStr;
use std::sync::LazyLock;
use std::time::Duration;

use cedar_policy::{
    Authorizer, Context, Entities, Entity, EntityId, EntityTypeName, EntityUid, PolicyId,
    PolicySet, Request, RestrictedExpression, Schema,
};
use mayfly_core::{
    Action, Decision, Policy, PolicyRequest, Scopes, SpiffeId, TaskContext, Timestamp,
};

pub use load::{PolicyLoadError, Problem, is_policy_file};

/// The Cedar schema every policy is validated against.
pub const SCHEMA: &str = include_str!("mayfly.cedarschema");

/// A validated set of Cedar policies, ready to decide.
pub struct CedarPolicy {
    set: PolicySet,
    /// `set` cut per action and agent; decisions read these.
    slices: slice::Slices,
    /// Where the policies came from, for logs.
    source: String,
    /// Each policy's annotations as limits, read once at load (asking
    /// Cedar for an annotation parses its key every time).
    limits: HashMap<PolicyId, Limits>,
    /// The tools of `tools.toml`, each an action of `call_tool`.
    tools: tools::Tools,
    /// Decisions made, for requests whose policies do not read the time.
    decisions: cache::Decisions,
    /// Whether any policy of the set reads the time (tool calls are
    /// decided by the whole set).
    reads_now: bool,
}

/// What a permit's annotations allow.
#[derive(Debug, Clone, Copy, Default)]
struct Limits {
    /// `@max_ttl`.
    max_ttl: Option<Duration>,
    /// `@approval("required")`.
    approval_required: bool,
}

impl std::fmt::Debug for CedarPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CedarPolicy")
            .field("source", &self.source)
            .field("policies", &self.limits.len())
            .finish()
    }
}

/// The actions of the schema.
const ACTIONS: [&str; 6] = [
    "start_task",
    "issue_token",
    "sign_certificate",
    "issue_database_login",
    "delegate",
    "exchange_token",
];

/// The schema's entity types. Parsing a name runs Cedar's parser, which
/// costs more than the rest of a decision, so each is parsed once.
#[derive(Clone, Copy)]
enum Type {
    Agent,
    Task,
    Action,
    Audience,
    CertificateKind,
    Path,
    Tool,
}

static TYPES: LazyLock<[EntityTypeName; 7]> = LazyLock::new(|| {
    [
        "Mayfly::Agent",
        "Mayfly::Task",
        "Mayfly::Action",
        "Mayfly::Audience",
        "Mayfly::CertificateKind",
        "Mayfly::Path",
        "Mayfly::Tool",
    ]
    .map(|name| {
        // Constant names from the schema: cannot fail.
        #[allow(clippy::expect_used)]
        EntityTypeName::from_str(name).expect("valid entity type name")
    })
});

fn uid(ty: Type, id: &str) -> EntityUid {
    EntityUid::from_type_name_and_id(TYPES[ty as usize].clone(), EntityId::new(id))
}

fn string(s: &str) -> RestrictedExpression {
    RestrictedExpression::new_string(s.to_owned())
}

/// An agent, in every [`Type::Path`] strictly above its SPIFFE ID, so
/// `principal in Mayfly::Path::"spiffe://td/agent"` is a segment-exact
/// subtree match. `authenticated_by` is how the principal proved itself
/// for this request; empty for another agent the request names.
fn agent_entity(
    id: &SpiffeId,
    authenticated_by: &str,
) -> Result<Entity, Box<cedar_policy::EntityAttrEvaluationError>> {
    Entity::new(
        uid(Type::Agent, id.as_str()),
        [
            ("spiffe_id".to_owned(), string(id.as_str())),
            ("trust_domain".to_owned(), string(id.trust_domain_name())),
            ("path".to_owned(), string(id.path())),
            ("authenticated_by".to_owned(), string(authenticated_by)),
        ]
        .into_iter()
        .collect(),
        id.ancestors().map(|p| uid(Type::Path, p)).collect(),
    )
    .map_err(Box::new)
}

fn task_entity(
    id: &str,
    intent: &str,
    context: &TaskContext,
) -> Result<Entity, Box<cedar_policy::EntityAttrEvaluationError>> {
    Entity::new_with_tags(
        uid(Type::Task, id),
        [("intent".to_owned(), string(intent))],
        [],
        context
            .entries()
            .iter()
            .map(|(k, v)| (k.clone(), string(v))),
    )
    .map_err(Box::new)
}

/// One request to Cedar.
#[derive(Clone)]
struct Ask<'a> {
    agent: &'a SpiffeId,
    /// How the principal proved itself: `certificate` or a token issuer.
    authenticated_by: &'a str,
    /// For a token: what it would be bound to (`context.binding`).
    binding: Option<&'a str>,
    /// For `delegate`: the agent the resource names, added to the entities.
    delegate: Option<&'a SpiffeId>,
    /// For `exchange_token`: the subject agent (added to the entities),
    /// the exchanged token's audience, and the resource server of that
    /// audience the caller is one of.
    exchange: Option<(&'a SpiffeId, &'a str, &'a str)>,
    /// For a tool call: its arguments (as `context.arguments`) and, for
    /// an HTTP route, its method and template.
    call: Option<(RestrictedExpression, &'a str, &'a str)>,
    /// The same call as the decision cache compares it: the arguments'
    /// canonical text (empty when unknown), the method and the template.
    call_key: Option<(&'a str, &'a str, &'a str)>,
    /// The action's name: one of [`ACTIONS`], or a tool's.
    action: &'a str,
    /// Decide with `context.arguments` unknown: permitted unless every
    /// value of them is denied.
    partial: bool,
    resource: EntityUid,
    task_id: &'a str,
    intent: &'a str,
    context: &'a TaskContext,
    scopes: Vec<&'a str>,
    ttl: Duration,
    now: Timestamp,
}

impl CedarPolicy {
    /// Whether `request`, its arguments unknown, could be permitted: a
    /// permit unless policy denies it whatever they are (or a policy fails
    /// to evaluate: fail closed). Names the policies that may decide.
    fn may(
        &self,
        request: &Request,
        policies: &PolicySet,
        entities: &Entities,
        ask: &Ask<'_>,
    ) -> Decision {
        let response = Authorizer::new().is_authorized_partial(request, policies, entities);
        if let Some(id) = response.definitely_errored().next() {
            return Decision::Deny {
                policy_id: Some(id.to_string()),
                reason: format!("policy {id} failed to evaluate; denying"),
            };
        }
        let ids = |ps: Vec<cedar_policy::Policy>| joined(ps.iter().map(cedar_policy::Policy::id));
        match response.decision() {
            Some(cedar_policy::Decision::Deny) => {
                let forbids: Vec<_> = response
                    .definitely_satisfied()
                    .filter(|p| p.effect() == cedar_policy::Effect::Forbid)
                    .collect();
                Decision::Deny {
                    policy_id: (!forbids.is_empty()).then(|| ids(forbids)),
                    reason: format!("no call lets {} {}", ask.agent, ask.what()),
                }
            }
            _ => Decision::Permit {
                policy_id: ids(response.may_be_determining().collect()),
                max_ttl: None,
                approval_required: false,
            },
        }
    }
}

impl Ask<'_> {
    /// What is asked, for a refusal: `issue_token https://api`, `call
    /// billing/pay_invoice`.
    fn what(&self) -> String {
        let resource = self.resource.id().unescaped().to_owned();
        match self.call {
            Some(_) => format!("call {resource}"),
            None => format!("{} {resource}", self.action),
        }
    }
}

/// The schema ([`SCHEMA`]) does not parse: a defect of this build, never
/// of the policies. Cedar's error is the source.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SchemaError(#[source] Box<cedar_policy::CedarSchemaError>);

impl CedarPolicy {
    /// The schema, parsed, without tools.
    pub fn schema() -> Result<Schema, SchemaError> {
        Self::schema_with(&tools::Tools::default())
    }

    /// The schema with an action for each of `tools`.
    fn schema_with(tools: &tools::Tools) -> Result<Schema, SchemaError> {
        let fragment = |text: &str| {
            cedar_policy::SchemaFragment::from_cedarschema_str(text)
                .map(|(f, _)| f)
                .map_err(|e| SchemaError(Box::new(e)))
        };
        Schema::from_schema_fragments([fragment(SCHEMA)?, fragment(&tools.schema())?])
            .map_err(|e| SchemaError(Box::new(e.into())))
    }

    /// How many policies the set holds.
    pub fn len(&self) -> usize {
        self.limits.len()
    }

    /// How many tools `tools.toml` declares.
    pub fn tools(&self) -> usize {
        self.tools.len()
    }

    /// Whether the set holds no policy (then everything is denied).
    pub fn is_empty(&self) -> bool {
        self.limits.is_empty()
    }

    /// Where the policies came from.
    pub fn source(&self) -> &str {
        &self.source
    }

    fn ask(&self, ask: Ask<'_>) -> Decision {
        let principal = uid(Type::Agent, ask.agent.as_str());
        match self.slices.get(ask.action, &principal) {
            // Decided by policies that ignore the time: the same request
            // gets the same decision while this set is in force.
            Some((policies, false)) => self
                .decisions
                .get_or(&ask, || self.ask_of(policies, ask.clone())),
            Some((policies, true)) => self.ask_of(policies, ask),
            None => self.ask_of(&self.set, ask),
        }
    }

    /// Decides `ask` with the whole set, from the cache when no policy
    /// reads the time.
    fn ask_whole(&self, ask: Ask<'_>) -> Decision {
        if self.reads_now {
            self.ask_of(&self.set, ask)
        } else {
            self.decisions
                .get_or(&ask, || self.ask_of(&self.set, ask.clone()))
        }
    }

    /// Decides `ask` with `policies` (a slice of `self.set`).
    fn ask_of(&self, policies: &PolicySet, ask: Ask<'_>) -> Decision {
        let fail = |what: String| Decision::Deny {
            policy_id: None,
            reason: format!("policy input could not be built: {what}"),
        };
        let task_uid = uid(Type::Task, ask.task_id);
        let mut entities = vec![
            agent_entity(ask.agent, ask.authenticated_by),
            task_entity(ask.task_id, ask.intent, ask.context),
        ];
        if let Some(d) = ask.delegate.filter(|d| *d != ask.agent) {
            entities.push(agent_entity(d, ""));
        }
        if let Some((subject, ..)) = ask.exchange.filter(|(s, ..)| *s != ask.agent) {
            entities.push(agent_entity(subject, ""));
        }
        if ask.call.is_some() {
            // A tool's action in its group, so `action in
            // Mayfly::Action::"call_tool"` holds.
            let group = uid(Type::Action, "call_tool");
            entities.push(Ok(Entity::new_no_attrs(
                uid(Type::Action, ask.action),
                [group.clone()].into_iter().collect(),
            )));
            entities.push(Ok(Entity::new_no_attrs(group, Default::default())));
        }
        let entities = match entities.into_iter().collect::<Result<Vec<_>, _>>() {
            Ok(list) => match Entities::from_entities(list, None) {
                Ok(e) => e,
                Err(e) => return fail(e.to_string()),
            },
            Err(e) => return fail(e.to_string()),
        };
        let exchange = ask.exchange.map(|(subject, audience, resource_server)| {
            [
                (
                    "subject".to_owned(),
                    RestrictedExpression::new_entity_uid(uid(Type::Agent, subject.as_str())),
                ),
                (
                    "subject_audience".to_owned(),
                    RestrictedExpression::new_entity_uid(uid(Type::Audience, audience)),
                ),
                ("resource_server".to_owned(), string(resource_server)),
            ]
        });
        let scope_prefixes = || {
            RestrictedExpression::new_set(
                ask.scopes
                    .iter()
                    .map(|s| s.split(':').next().unwrap_or(s))
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .map(string),
            )
        };
        let now =
            || RestrictedExpression::new_long(i64::try_from(ask.now.as_secs()).unwrap_or(i64::MAX));
        let context = match &ask.call {
            Some((arguments, method, route)) => Context::from_pairs([
                (
                    "task".to_owned(),
                    RestrictedExpression::new_entity_uid(task_uid),
                ),
                (
                    "scopes".to_owned(),
                    RestrictedExpression::new_set(ask.scopes.iter().map(|s| string(s))),
                ),
                ("scope_prefixes".to_owned(), scope_prefixes()),
                ("binding".to_owned(), string(ask.binding.unwrap_or("none"))),
                ("now".to_owned(), now()),
                ("method".to_owned(), string(method)),
                ("route".to_owned(), string(route)),
                ("arguments".to_owned(), arguments.clone()),
            ]),
            None => Context::from_pairs(
                exchange
                    .into_iter()
                    .flatten()
                    .chain(ask.binding.map(|b| ("binding".to_owned(), string(b))))
                    .chain([
                        (
                            "task".to_owned(),
                            RestrictedExpression::new_entity_uid(task_uid),
                        ),
                        (
                            "scopes".to_owned(),
                            RestrictedExpression::new_set(ask.scopes.iter().map(|s| string(s))),
                        ),
                        ("scope_prefixes".to_owned(), scope_prefixes()),
                        (
                            "ttl_seconds".to_owned(),
                            RestrictedExpression::new_long(
                                i64::try_from(ask.ttl.as_secs()).unwrap_or(i64::MAX),
                            ),
                        ),
                        ("now".to_owned(), now()),
                    ]),
            ),
        };
        let context = match context {
            Ok(c) => c,
            Err(e) => return fail(e.to_string()),
        };
        let principal = uid(Type::Agent, ask.agent.as_str());
        let request = match Request::new(
            principal.clone(),
            uid(Type::Action, ask.action),
            ask.resource.clone(),
            context,
            None,
        ) {
            Ok(r) => r,
            Err(e) => return fail(e.to_string()),
        };
        if ask.partial {
            return self.may(&request, policies, &entities, &ask);
        }
        let response = Authorizer::new().is_authorized(&request, policies, &entities);
        let diagnostics = response.diagnostics();
        // A policy that errors is skipped by Cedar; a skipped forbid could
        // let something through, so any error denies.
        if let Some(cedar_policy::AuthorizationError::PolicyEvaluationError(err)) =
            diagnostics.errors().next()
        {
            return Decision::Deny {
                policy_id: Some(err.policy_id().to_string()),
                reason: format!("policy {} failed to evaluate; denying", err.policy_id()),
            };
        }
        let deciding: Vec<&PolicyId> = diagnostics.reason().collect();
        let ids = || joined(deciding.iter().copied());
        match response.decision() {
            cedar_policy::Decision::Allow => {
                let limits = || deciding.iter().filter_map(|p| self.limits.get(*p));
                Decision::Permit {
                    policy_id: ids(),
                    max_ttl: limits().filter_map(|l| l.max_ttl).min(),
                    approval_required: limits().any(|l| l.approval_required),
                }
            }
            cedar_policy::Decision::Deny if !deciding.is_empty() => Decision::Deny {
                policy_id: Some(ids()),
                reason: format!("{} {} is forbidden", ask.agent, ask.what()),
            },
            cedar_policy::Decision::Deny => Decision::Deny {
                policy_id: None,
                reason: format!("no policy permits {} to {}", ask.agent, ask.what()),
            },
        }
    }
}

/// Policy ids as a decision names them: sorted, once each, joined by `,`.
fn joined<'p>(ids: impl Iterator<Item = &'p PolicyId>) -> String {
    ids.map(ToString::to_string)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect::<Vec<_>>()
        .join(",")
}

/// Combines the decisions for each audience of an envelope: all must
/// permit; ids are joined, the shortest cap and any approval carry over.
fn all_of(decisions: impl IntoIterator<Item = Decision>) -> Decision {
    let mut ids = BTreeSet::new();
    let (mut cap, mut approval): (Option<Duration>, bool) = (None, false);
    for d in decisions {
        match d {
            Decision::Permit {
                policy_id,
                max_ttl,
                approval_required,
            } => {
                ids.extend(policy_id.split(',').map(str::to_owned));
                cap = match (cap, max_ttl) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                approval |= approval_required;
            }
            deny => return deny,
        }
    }
    Decision::Permit {
        policy_id: ids.into_iter().collect::<Vec<_>>().join(","),
        max_ttl: cap,
        approval_required: approval,
    }
}

/// The scopes as Cedar gets them.
fn names(scopes: &Scopes) -> Vec<&str> {
    scopes.iter().map(|s| s.as_str()).collect()
}

/// Each [`PolicyRequest`] as Cedar requests: one for most actions, one per
/// audience of the envelope for `start_task` (all must permit).
impl Policy for CedarPolicy {
    fn decide(&self, req: &PolicyRequest<'_>) -> Decision {
        let base = |resource: EntityUid, scopes| Ask {
            agent: req.principal,
            authenticated_by: req.proof.name(),
            binding: None,
            delegate: None,
            exchange: None,
            call: None,
            call_key: None,
            action: req.action.name(),
            partial: false,
            resource,
            task_id: req.task.id.map_or("new", |id| id.as_str()),
            intent: req.task.intent.as_str(),
            context: req.task.context,
            scopes,
            ttl: req.ttl,
            now: req.now,
        };
        match req.action {
            Action::StartTask { envelope } => all_of(envelope.audiences().iter().map(|aud| {
                self.ask(base(
                    uid(Type::Audience, aud.as_str()),
                    names(envelope.scopes()),
                ))
            })),
            Action::IssueToken {
                audience,
                scopes,
                binding,
            } => self.ask(Ask {
                binding: Some(binding.name()),
                ..base(uid(Type::Audience, audience.as_str()), names(scopes))
            }),
            Action::SignCertificate => {
                self.ask(base(uid(Type::CertificateKind, "task"), Vec::new()))
            }
            Action::IssueDatabaseLogin { database, scopes } => {
                self.ask(base(uid(Type::Audience, database.as_str()), names(scopes)))
            }
            Action::Delegate { delegate, envelope } => self.ask(Ask {
                delegate: Some(delegate),
                ..base(
                    uid(Type::Agent, delegate.as_str()),
                    names(envelope.scopes()),
                )
            }),
            Action::ExchangeToken {
                subject,
                subject_audience,
                resource_server,
                audience,
                scopes,
                binding,
            } => self.ask(Ask {
                binding: Some(binding.name()),
                exchange: Some((subject, subject_audience.as_str(), resource_server)),
                ..base(uid(Type::Audience, audience.as_str()), names(scopes))
            }),
            Action::CallTool {
                tool,
                arguments: raw,
                route,
                scopes,
                binding,
            } => {
                let arguments = match self.tools.arguments(tool, raw) {
                    Ok(a) => a,
                    Err(unfit) => {
                        return Decision::Deny {
                            policy_id: None,
                            reason: unfit.to_string(),
                        };
                    }
                };
                let name = tool.to_string();
                let (method, template) = route.map_or(("", ""), |r| (r.method, r.template));
                // Tool actions are not sliced: the whole set decides.
                let ask = Ask {
                    binding: Some(binding.name()),
                    call: Some((arguments, method, template)),
                    call_key: Some((raw.canonical(), method, template)),
                    action: &name,
                    ..base(uid(Type::Tool, &name), names(scopes))
                };
                self.ask_whole(ask)
            }
            Action::MayCallTool {
                tool,
                scopes,
                binding,
            } => {
                if !self.tools.declares(tool) {
                    return Decision::Deny {
                        policy_id: None,
                        reason: tools::Unfit::Undeclared(tool.to_string()).to_string(),
                    };
                }
                let name = tool.to_string();
                let ask = Ask {
                    binding: Some(binding.name()),
                    call: Some((RestrictedExpression::new_unknown("arguments"), "", "")),
                    call_key: Some(("", "", "")),
                    action: &name,
                    partial: true,
                    ..base(uid(Type::Tool, &name), names(scopes))
                };
                self.ask_whole(ask)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]

    use mayfly_core::TaskContext;

    use super::*;

    /// Policies naming agents, lists of actions, and one that fails to
    /// evaluate, on top of the shipped example.
    const EXTRA: &str = r#"
@id("bob-reads-and-tasks")
@max_ttl("1m")
permit (
  principal == Mayfly::Agent::"spiffe://prod.example.com/agents/bob",
  action in [Mayfly::Action::"issue_token", Mayfly::Action::"start_task"],
  resource
);

@id("bob-never-admin")
forbid (principal == Mayfly::Agent::"spiffe://prod.example.com/agents/bob", action, resource)
when { context.scope_prefixes.contains("admin") };

@id("carol-overflows")
forbid (
  principal == Mayfly::Agent::"spiffe://prod.example.com/agents/carol",
  action == Mayfly::Action::"issue_token",
  resource
)
when { context.ttl_seconds * 4611686018427387904 > 0 };
"#;

    #[test]
    fn slices_decide_exactly_as_the_whole_set() {
        let shipped = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../deploy/policies/mayfly.cedar");
        let sources = vec![
            (
                "shipped".to_owned(),
                std::fs::read_to_string(shipped).unwrap(),
            ),
            ("extra".to_owned(), EXTRA.to_owned()),
        ];
        let p = CedarPolicy::from_sources(&sources, "test").unwrap();
        let agents = [
            "spiffe://prod.example.com/agents/support/triage",
            "spiffe://prod.example.com/agents/bob",
            "spiffe://prod.example.com/agents/carol",
            "spiffe://other.example.com/agents/x",
        ]
        .map(|a| SpiffeId::new(a).unwrap());
        let contexts = [
            vec![],
            vec![("environment", "production")],
            vec![("data_sensitivity", "restricted")],
        ]
        .map(|c| TaskContext::new(c).unwrap());
        let scope_sets: [&[&str]; 4] = [
            &["read:tickets"],
            &["write:tickets"],
            &["admin:tickets"],
            &["read:tickets", "export:tickets"],
        ];
        let worker = SpiffeId::new("spiffe://prod.example.com/agents/workers/w").unwrap();
        let resources = [
            (
                "start_task",
                uid(Type::Audience, "https://tickets.prod.example.com"),
            ),
            (
                "issue_token",
                uid(Type::Audience, "https://tickets.prod.example.com"),
            ),
            (
                "issue_token",
                uid(Type::Audience, "https://payments.prod.example.com"),
            ),
            ("sign_certificate", uid(Type::CertificateKind, "task")),
            ("delegate", uid(Type::Agent, worker.as_str())),
            (
                "exchange_token",
                uid(Type::Audience, "https://payments.prod.example.com"),
            ),
        ];
        let (mut permits, mut forbids, mut errors, mut defaults) = (0, 0, 0, 0);
        for agent in &agents {
            for context in &contexts {
                for scopes in scope_sets {
                    for (action, resource) in &resources {
                        for ttl in [60, 3600] {
                            let ask = Ask {
                                agent,
                                authenticated_by: mayfly_core::Proof::CERTIFICATE,
                                binding: matches!(*action, "issue_token" | "exchange_token")
                                    .then_some("none"),
                                delegate: (*action == "delegate").then_some(&worker),
                                exchange: (*action == "exchange_token").then_some((
                                    &worker,
                                    "https://tickets.prod.example.com",
                                    "tickets",
                                )),
                                call: None,
                                call_key: None,
                                partial: false,
                                action,
                                resource: resource.clone(),
                                task_id: "t",
                                intent: "i",
                                context,
                                scopes: scopes.to_vec(),
                                ttl: Duration::from_secs(ttl),
                                now: Timestamp::now(),
                            };
                            let sliced = p.ask(ask.clone());
                            // Asked again: from the cache this time.
                            let again = p.ask(ask.clone());
                            let whole = p.ask_of(&p.set, ask);
                            assert_eq!(sliced, whole, "{agent} {action} {scopes:?} {context:?}");
                            assert_eq!(again, whole, "{agent} {action} {scopes:?} {context:?}");
                            match &whole {
                                Decision::Permit { .. } => permits += 1,
                                Decision::Deny { reason, .. } if reason.contains("failed") => {
                                    errors += 1
                                }
                                Decision::Deny {
                                    policy_id: Some(_), ..
                                } => forbids += 1,
                                Decision::Deny { .. } => defaults += 1,
                                other => panic!("unexpected {other:?}"),
                            }
                        }
                    }
                }
            }
        }
        // Every kind of outcome was compared.
        assert!(permits > 0 && forbids > 0 && errors > 0 && defaults > 0);
    }

    /// One policy set from `text`.
    fn policy(text: &str) -> CedarPolicy {
        CedarPolicy::from_sources(&[("p".to_owned(), text.to_owned())], "test").unwrap()
    }

    fn ask_at<'a>(agent: &'a SpiffeId, context: &'a TaskContext, now: u64) -> Ask<'a> {
        Ask {
            agent,
            authenticated_by: mayfly_core::Proof::CERTIFICATE,
            binding: Some("none"),
            delegate: None,
            exchange: None,
            call: None,
            call_key: None,
            partial: false,
            action: "issue_token",
            resource: uid(Type::Audience, "https://api.example.com"),
            task_id: "t",
            intent: "i",
            context,
            scopes: vec!["read:files"],
            ttl: Duration::from_secs(60),
            now: Timestamp::from_secs(now),
        }
    }

    #[test]
    fn policy_sees_how_the_principal_proved_itself_and_caches_each_apart() {
        let p = policy(
            r#"@id("all") permit (principal, action, resource);
@id("certificates-only") forbid (principal, action, resource)
  unless { principal.authenticated_by == "certificate" };"#,
        );
        let agent = SpiffeId::new("spiffe://example.org/agent/a").unwrap();
        let context = TaskContext::default();
        let with_cert = ask_at(&agent, &context, 1);
        let with_token = Ask {
            authenticated_by: "https://kubernetes.default.svc",
            ..ask_at(&agent, &context, 1)
        };
        for _ in 0..2 {
            // Asked twice: the second answers come from the cache, each
            // its own.
            assert!(matches!(p.ask(with_cert.clone()), Decision::Permit { .. }));
            assert!(matches!(
                p.ask(with_token.clone()),
                Decision::Deny { policy_id: Some(id), .. } if id == "certificates-only"
            ));
        }
    }

    #[test]
    fn policy_can_require_proof_of_possession() {
        let p = policy(
            r#"@id("all") permit (principal, action, resource);
@id("bound-only") forbid (principal, action == Mayfly::Action::"issue_token", resource)
  unless { context.binding != "none" };"#,
        );
        let agent = SpiffeId::new("spiffe://example.org/agent/a").unwrap();
        let context = TaskContext::default();
        for (binding, permitted) in [("none", false), ("dpop", true), ("certificate", true)] {
            let ask = Ask {
                binding: Some(binding),
                ..ask_at(&agent, &context, 1)
            };
            for _ in 0..2 {
                assert_eq!(
                    matches!(p.ask(ask.clone()), Decision::Permit { .. }),
                    permitted,
                    "{binding}"
                );
            }
        }
    }

    #[test]
    fn decisions_that_read_the_time_are_made_every_time() {
        let agent = SpiffeId::new("spiffe://example.org/agent/a").unwrap();
        let context = TaskContext::default();
        // Every spelling that reads the time, escapes included.
        for condition in [
            "context.now < 2000000000",
            "context[\"n\\u{6f}w\"] < 2000000000",
            "context has now && context.now < 2000000000",
        ] {
            let p = policy(&format!(
                "@id(\"until\") permit (principal, action, resource) when {{ {condition} }};"
            ));
            let before = p.ask(ask_at(&agent, &context, 1_900_000_000));
            assert!(matches!(before, Decision::Permit { .. }), "{condition}");
            let after = p.ask(ask_at(&agent, &context, 2_100_000_000));
            assert!(
                matches!(after, Decision::Deny { .. }),
                "{condition}: {after:?}"
            );
            assert_eq!(p.decisions.len(), 0, "{condition}: nothing kept");
        }
    }

    #[test]
    fn a_kept_decision_is_only_reused_for_the_same_request() {
        let agent = SpiffeId::new("spiffe://example.org/agent/a").unwrap();
        let p = policy(
            r#"@id("staging") permit (principal, action, resource)
               when { context.task.hasTag("environment") && context.task.getTag("environment") == "staging" };"#,
        );
        let staging = TaskContext::new([("environment", "staging")]).unwrap();
        let production = TaskContext::new([("environment", "production")]).unwrap();
        let first = p.ask(ask_at(&agent, &staging, 1));
        assert!(matches!(first, Decision::Permit { .. }));
        assert_eq!(p.decisions.len(), 1);
        // The same task id with another context: decided again, and denied.
        let changed = p.ask(ask_at(&agent, &production, 1));
        assert!(matches!(changed, Decision::Deny { .. }), "{changed:?}");
        // Another scope, another TTL, another agent: each decided anew.
        let mut other = ask_at(&agent, &staging, 1);
        other.scopes = vec!["write:files"];
        p.ask(other);
        let mut longer = ask_at(&agent, &staging, 1);
        longer.ttl = Duration::from_secs(61);
        p.ask(longer);
        let bob = SpiffeId::new("spiffe://example.org/agent/bob").unwrap();
        p.ask(ask_at(&bob, &staging, 1));
        assert_eq!(p.decisions.len(), 5);
        // The first request again, at another time: the kept decision.
        assert_eq!(p.ask(ask_at(&agent, &staging, 99)), first);
        assert_eq!(p.decisions.len(), 5);
    }
}
