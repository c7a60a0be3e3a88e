//! The store's Lua scripts (each with `common.lua` in front), hashed once,
//! and how a script may be sent.

use redis::Script;

/// Whether a script may be sent again when its connection fails under it.
#[derive(Debug, Clone, Copy)]
pub(super) enum Repeat {
    /// Its second run recognises or repeats harmlessly what the first did.
    Safe,
    /// Sent once: a second run would answer differently (an end, a decision).
    Once,
}

pub(super) fn script(body: &str) -> Script {
    Script::new(&format!("{}\n{}", include_str!("common.lua"), body))
}

/// The Lua scripts, hashed once.
pub(super) struct Scripts {
    pub(super) start_task: Script,
    pub(super) issue: Script,
    pub(super) issue_recorded: Script,
    pub(super) end_task: Script,
    pub(super) revoke_lease: Script,
    pub(super) expire: Script,
    pub(super) purge: Script,
    pub(super) approval_decide: Script,
    pub(super) approval_consume: Script,
    pub(super) update_context: Script,
}

impl Scripts {
    pub(super) fn new() -> Self {
        Self {
            start_task: script(include_str!("start_task.lua")),
            issue: script(include_str!("issue.lua")),
            issue_recorded: script(include_str!("issue_recorded.lua")),
            end_task: script(include_str!("end_task.lua")),
            revoke_lease: script(include_str!("revoke_lease.lua")),
            expire: script(include_str!("expire.lua")),
            purge: script(include_str!("purge.lua")),
            approval_decide: script(include_str!("approval_decide.lua")),
            approval_consume: script(include_str!("approval_consume.lua")),
            update_context: script(include_str!("update_context.lua")),
        }
    }
}

/// Appends `EVALSHA script keys… args…` to a pipeline.
pub(super) fn evalsha(
    pipe: &mut redis::Pipeline,
    script: &Script,
    keys: &[String],
    args: &[String],
) {
    pipe.cmd("EVALSHA")
        .arg(script.get_hash())
        .arg(keys.len())
        .arg(keys)
        .arg(args);
}
