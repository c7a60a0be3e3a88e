//! Decisions already made, reused when the same request comes again.
//!
//! A Cedar decision is a pure function of the policies, the entities and
//! the request. Everything Mayfly gives Cedar comes from the request (agent,
//! action, resource, task id, intent, context, scopes, TTL), except
//! `context.now`. (A tool call's arguments are in the key, as their
//! canonical text, with its route.) So where none of the policies that can decide a request
//! mentions `now` (see [`reads_now`]), the same request is decided the same
//! way for as long as this policy set is in force; a reload builds a new
//! `CedarPolicy`, whose cache starts empty. The key is the whole request,
//! compared field by field on every hit, so two requests share a decision
//! only when Cedar would see the same input.
//!
//! Memory is bounded by two generations of [`CAPACITY`] entries: when the
//! current map is full, the previous one is dropped and the current one
//! takes its place.

use std::collections::{BTreeMap, HashMap};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::{Mutex, PoisonError};

use cedar_policy::{EntityUid, Policy};
use mayfly_core::Decision;

use crate::Ask;

/// Most decisions one generation holds.
pub(crate) const CAPACITY: usize = 16 * 1024;

/// Whether `policy` could read `context.now`. Conservative: it looks for
/// `now` anywhere in the policy's parsed form (JSON, with string escapes
/// resolved, so `context["n\u{6f}w"]` is caught), so an annotation or a
/// string that merely contains the word also counts, and a policy that
/// cannot be shown as JSON counts too.
pub(crate) fn reads_now(policy: &Policy) -> bool {
    policy
        .to_json()
        .map_or(true, |json| json.to_string().contains("now"))
}

/// The request, owned, as Cedar sees it (all but `now`).
#[derive(Debug, PartialEq, Eq)]
struct Key {
    action: String,
    agent: String,
    authenticated_by: String,
    binding: Option<String>,
    delegate: Option<String>,
    exchange: Option<(String, String, String)>,
    resource: EntityUid,
    task_id: String,
    intent: String,
    context: BTreeMap<String, String>,
    scopes: Vec<String>,
    ttl_seconds: u64,
    /// A tool call's arguments (canonical), method and template, and
    /// whether the arguments were left unknown.
    call: Option<(String, String, String)>,
    partial: bool,
}

impl Key {
    fn of(ask: &Ask<'_>) -> Self {
        Self {
            action: ask.action.to_owned(),
            agent: ask.agent.to_string(),
            authenticated_by: ask.authenticated_by.to_owned(),
            binding: ask.binding.map(str::to_owned),
            delegate: ask.delegate.map(ToString::to_string),
            exchange: ask
                .exchange
                .map(|(s, a, r)| (s.to_string(), a.to_owned(), r.to_owned())),
            resource: ask.resource.clone(),
            task_id: ask.task_id.to_owned(),
            intent: ask.intent.to_owned(),
            context: ask.context.entries().clone(),
            scopes: ask.scopes.iter().map(|s| (*s).to_owned()).collect(),
            ttl_seconds: ask.ttl.as_secs(),
            call: ask
                .call_key
                .map(|(a, m, t)| (a.to_owned(), m.to_owned(), t.to_owned())),
            partial: ask.partial,
        }
    }

    /// Whether `ask` is this request.
    fn is(&self, ask: &Ask<'_>) -> bool {
        self.action == ask.action
            && self.agent == ask.agent.as_str()
            && self.authenticated_by == ask.authenticated_by
            && self.binding.as_deref() == ask.binding
            && self.delegate.as_deref() == ask.delegate.map(|d| d.as_str())
            && self
                .exchange
                .as_ref()
                .map(|(s, a, r)| (s.as_str(), a.as_str(), r.as_str()))
                == ask.exchange.map(|(s, a, r)| (s.as_str(), a, r))
            && self.resource == ask.resource
            && self.task_id == ask.task_id
            && self.intent == ask.intent
            && self.ttl_seconds == ask.ttl.as_secs()
            && self.scopes.len() == ask.scopes.len()
            && self.scopes.iter().zip(&ask.scopes).all(|(a, b)| a == b)
            && &self.context == ask.context.entries()
            && self.partial == ask.partial
            && self
                .call
                .as_ref()
                .map(|(a, m, t)| (a.as_str(), m.as_str(), t.as_str()))
                == ask.call_key
    }
}

/// A hash of everything [`Key::is`] compares.
fn hash(ask: &Ask<'_>) -> u64 {
    let mut h = DefaultHasher::new();
    ask.action.hash(&mut h);
    ask.agent.as_str().hash(&mut h);
    ask.authenticated_by.hash(&mut h);
    ask.binding.hash(&mut h);
    ask.delegate.map(|d| d.as_str()).hash(&mut h);
    ask.exchange
        .map(|(s, a, r)| (s.as_str(), a, r))
        .hash(&mut h);
    ask.resource.hash(&mut h);
    ask.task_id.hash(&mut h);
    ask.intent.hash(&mut h);
    ask.context.entries().hash(&mut h);
    ask.scopes.hash(&mut h);
    ask.ttl.as_secs().hash(&mut h);
    ask.call_key.hash(&mut h);
    ask.partial.hash(&mut h);
    h.finish()
}

#[derive(Debug, Default)]
struct Generations {
    current: HashMap<u64, (Key, Decision)>,
    previous: HashMap<u64, (Key, Decision)>,
}

/// The decisions of one policy set.
#[derive(Debug, Default)]
pub(crate) struct Decisions {
    inner: Mutex<Generations>,
}

impl Decisions {
    /// The decision for `ask` if it was made before, else `decide()`'s,
    /// which is kept.
    pub(crate) fn get_or(&self, ask: &Ask<'_>, decide: impl FnOnce() -> Decision) -> Decision {
        // A tool call is cached only with its arguments in the key.
        if ask.call.is_some() && ask.call_key.is_none() {
            return decide();
        }
        let h = hash(ask);
        {
            // Each operation is one insert or lookup: a panic elsewhere
            // cannot leave the maps half-changed.
            let g = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some((key, decision)) = g.current.get(&h).or_else(|| g.previous.get(&h))
                && key.is(ask)
            {
                return decision.clone();
            }
        }
        let decision = decide();
        let mut g = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if g.current.len() >= CAPACITY {
            g.previous = std::mem::take(&mut g.current);
        }
        g.current.insert(h, (Key::of(ask), decision.clone()));
        decision
    }

    /// How many decisions are kept (both generations).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        let g = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        g.current.len() + g.previous.len()
    }
}
