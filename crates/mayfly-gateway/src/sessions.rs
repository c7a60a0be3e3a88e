//! MCP sessions bound to the task that opened them. A Streamable HTTP
//! server names a session in its answer to `initialize`
//! (`Mcp-Session-Id`); the gateway remembers which task's token opened
//! it, and answers a request that names the session with another task's
//! token 404, as for a session that does not exist (the MCP transport's
//! answer, on which a client starts a session of its own). So a session
//! id seen elsewhere carries no other task's state.
//!
//! A session the gateway never saw opened (one opened before it started,
//! or through another replica) is let through: every call in it is still
//! decided on the token that makes it.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use http::StatusCode;

use crate::refusal::{Refusal, code};

/// The session header.
pub const HEADER: &str = "mcp-session-id";

/// Most sessions remembered; beyond that the oldest go.
const CAPACITY: usize = 100_000;

/// A session unused this long is forgotten first.
const IDLE: Duration = Duration::from_secs(24 * 3600);

/// The sessions each upstream opened, and their tasks.
#[derive(Debug, Default)]
pub struct Sessions {
    map: Mutex<HashMap<(String, String), Session>>,
}

/// One session.
#[derive(Debug)]
struct Session {
    task: String,
    used: Instant,
    /// Its client takes URL elicitations.
    url_elicitation: bool,
}

impl Sessions {
    /// Refuses `session` at `upstream` if another task opened it.
    pub fn check(&self, upstream: &str, session: &str, task: &str) -> Result<(), Refusal> {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        match map.get_mut(&(upstream.to_owned(), session.to_owned())) {
            Some(s) if s.task != task => Err(Refusal::new(
                StatusCode::NOT_FOUND,
                "session_not_found",
                code::INVALID_REQUEST,
                "no such session for this task: start a session with initialize",
            )),
            Some(s) => {
                s.used = Instant::now();
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// Whether the client of `session` takes URL elicitations.
    pub fn url_elicitation(&self, upstream: &str, session: &str) -> bool {
        let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        map.get(&(upstream.to_owned(), session.to_owned()))
            .is_some_and(|s| s.url_elicitation)
    }

    /// Remembers that `task` opened `session` at `upstream`, with a client
    /// that takes URL elicitations or not.
    pub fn bind(&self, upstream: &str, session: &str, task: &str, url_elicitation: bool) {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= CAPACITY {
            map.retain(|_, s| s.used.elapsed() < IDLE);
        }
        if map.len() >= CAPACITY
            && let Some(oldest) = map
                .iter()
                .min_by_key(|(_, s)| s.used)
                .map(|(k, _)| k.clone())
        {
            map.remove(&oldest);
        }
        map.insert(
            (upstream.to_owned(), session.to_owned()),
            Session {
                task: task.to_owned(),
                used: Instant::now(),
                url_elicitation,
            },
        );
    }

    /// Forgets `session` (ended by its task).
    pub fn forget(&self, upstream: &str, session: &str) {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        map.remove(&(upstream.to_owned(), session.to_owned()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_serves_the_task_that_opened_it_only() {
        let s = Sessions::default();
        assert!(
            s.check("billing", "s1", "task-a").is_ok(),
            "unknown: let through"
        );
        s.bind("billing", "s1", "task-a", true);
        assert!(s.url_elicitation("billing", "s1"));
        assert!(!s.url_elicitation("billing", "s2"));
        assert!(s.check("billing", "s1", "task-a").is_ok());
        let other = s.check("billing", "s1", "task-b").unwrap_err();
        assert_eq!(other.status, StatusCode::NOT_FOUND);
        // The same id at another upstream is another session.
        assert!(s.check("ledger", "s1", "task-b").is_ok());
        s.forget("billing", "s1");
        assert!(s.check("billing", "s1", "task-b").is_ok());
    }
}
