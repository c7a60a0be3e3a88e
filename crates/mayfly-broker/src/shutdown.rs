//! The broker's one stop signal. [`Broker::serve`](crate::Broker::serve)
//! holds the [`Trigger`]; every long-running task (both ports and each of
//! their connections, the feed, the reaper, the policy watcher, health)
//! holds a [`Shutdown`] and ends when it resolves.

use tokio::sync::watch;

/// Stops everything that follows a [`Shutdown`] made from it, once fired
/// or dropped.
#[derive(Debug)]
pub(crate) struct Trigger(watch::Sender<bool>);

/// A task's view of the stop signal: cheap to clone, one per task.
#[derive(Debug, Clone)]
pub(crate) struct Shutdown(watch::Receiver<bool>);

/// A new stop signal, not yet fired.
pub(crate) fn channel() -> (Trigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (Trigger(tx), Shutdown(rx))
}

impl Trigger {
    /// Tells every [`Shutdown`] to resolve.
    pub(crate) fn fire(&self) {
        self.0.send_replace(true);
    }

    /// A [`Shutdown`] that resolves when this fires.
    pub(crate) fn subscribe(&self) -> Shutdown {
        Shutdown(self.0.subscribe())
    }
}

impl Shutdown {
    /// Resolves once the signal has fired (at once if it already has) or
    /// its [`Trigger`] is gone.
    pub(crate) async fn wait(&mut self) {
        let _ = self.0.wait_for(|stopped| *stopped).await;
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn resolves_on_fire_for_every_clone_and_late_subscriber() {
        let (trigger, mut a) = channel();
        let mut b = a.clone();
        let pending = tokio::time::timeout(Duration::from_millis(20), a.wait()).await;
        assert!(pending.is_err(), "resolved before it fired");
        trigger.fire();
        a.wait().await;
        b.wait().await;
        trigger.subscribe().wait().await;
    }

    #[tokio::test]
    async fn resolves_when_the_trigger_is_gone() {
        let (trigger, mut s) = channel();
        drop(trigger);
        s.wait().await;
    }
}
