//! The policy set cut per action and agent, so a decision evaluates only
//! the policies that can apply to it. Cedar rebuilds each policy's
//! condition on every evaluation, so a decision costs about as much per
//! policy evaluated as the rest of it together.
//!
//! A policy whose scope names another action or another agent is false
//! before its `when` clause runs: it can neither permit, forbid, nor fail.
//! Leaving it out therefore gives the same decision.

use std::collections::HashMap;

use cedar_policy::{
    ActionConstraint, EntityUid, Policy, PolicySet, PolicySetError, PrincipalConstraint,
};

use crate::{ACTIONS, Type, uid};

/// The policies that can apply to one action.
#[derive(Debug, Default)]
struct Slice {
    /// Policies for any principal (`principal`, `principal in …`, `is`).
    any_agent: Part,
    /// For each agent a policy names with `principal == …`: those plus
    /// `any_agent`.
    by_agent: HashMap<EntityUid, Part>,
}

/// Some policies, and whether any of them could read `context.now`.
#[derive(Debug, Default)]
struct Part {
    set: PolicySet,
    reads_now: bool,
}

impl Part {
    fn add(&mut self, p: &Policy) -> Result<(), Box<PolicySetError>> {
        self.set.add(p.clone())?;
        self.reads_now |= crate::cache::reads_now(p);
        Ok(())
    }
}

/// Per-action slices of a validated set.
#[derive(Debug, Default)]
pub(crate) struct Slices {
    by_action: HashMap<&'static str, Slice>,
}

fn applies_to_action(p: &Policy, action: &EntityUid) -> bool {
    match p.action_constraint() {
        ActionConstraint::Any => true,
        ActionConstraint::Eq(a) => &a == action,
        // The schema declares no action groups, so `in` is membership.
        ActionConstraint::In(list) => list.contains(action),
    }
}

impl Slices {
    pub(crate) fn new(set: &PolicySet) -> Result<Self, Box<PolicySetError>> {
        let mut by_action = HashMap::new();
        for action in ACTIONS {
            let action_uid = uid(Type::Action, action);
            let policies: Vec<&Policy> = set
                .policies()
                .filter(|p| applies_to_action(p, &action_uid))
                .collect();
            let mut slice = Slice::default();
            for p in &policies {
                match p.principal_constraint() {
                    PrincipalConstraint::Eq(agent) => {
                        slice.by_agent.entry(agent).or_default();
                    }
                    _ => slice.any_agent.add(p)?,
                }
            }
            for (agent, own) in &mut slice.by_agent {
                for p in &policies {
                    let named = matches!(p.principal_constraint(), PrincipalConstraint::Eq(a) if &a == agent);
                    let general = !matches!(p.principal_constraint(), PrincipalConstraint::Eq(_));
                    if named || general {
                        own.add(p)?;
                    }
                }
            }
            by_action.insert(action, slice);
        }
        Ok(Self { by_action })
    }

    /// The policies that can decide `action` for `agent`, and whether any
    /// of them could read `context.now`; `None` for an action outside the
    /// schema.
    pub(crate) fn get(&self, action: &str, agent: &EntityUid) -> Option<(&PolicySet, bool)> {
        let slice = self.by_action.get(action)?;
        let part = slice.by_agent.get(agent).unwrap_or(&slice.any_agent);
        Some((&part.set, part.reads_now))
    }
}
