//! The group-commit writer: one thread takes every change waiting (up to
//! [`MAX_BATCH`]), applies them in order in one write transaction and
//! commits once; a change that fails is answered with its error and the
//! rest are applied again without it.

use redb::Database;
use tokio::sync::oneshot;

use super::tables::Tables;
use crate::cause::Cause;
use crate::store::StoreError;

/// Most changes one commit holds.
pub const MAX_BATCH: usize = 256;

/// One queued change, type-erased: applied (maybe more than once, if a
/// later change in its batch fails), then answered once.
pub(super) trait Change: Send {
    fn apply(&mut self, tables: &mut Tables<'_>) -> Result<(), StoreError>;
    fn succeed(self: Box<Self>);
    fn fail(self: Box<Self>, e: StoreError);
}

pub(super) struct Typed<T, F> {
    pub f: F,
    pub out: Option<T>,
    pub reply: oneshot::Sender<Result<T, StoreError>>,
}

impl<T, F> Change for Typed<T, F>
where
    T: Send,
    F: FnMut(&mut Tables<'_>) -> Result<T, StoreError> + Send,
{
    fn apply(&mut self, tables: &mut Tables<'_>) -> Result<(), StoreError> {
        self.out = Some((self.f)(tables)?);
        Ok(())
    }

    fn succeed(self: Box<Self>) {
        let reply = match self.out {
            Some(v) => Ok(v),
            None => Err(StoreError::Unavailable(Cause::msg(
                "change was never applied",
            ))),
        };
        let _ = self.reply.send(reply);
    }

    fn fail(self: Box<Self>, e: StoreError) {
        let _ = self.reply.send(Err(e));
    }
}

/// The writer thread and the queue to it.
pub(super) struct Writer {
    pub queue: Option<std::sync::mpsc::Sender<Box<dyn Change>>>,
    pub thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Writer {
    fn drop(&mut self) {
        // Closing the queue stops the thread after its batch; joining it
        // releases the database before the store is reopened.
        drop(self.queue.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Takes what is queued, batch by batch, until the queue closes.
pub(super) fn write_batches(db: &Database, queue: &std::sync::mpsc::Receiver<Box<dyn Change>>) {
    while let Ok(first) = queue.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(c) => batch.push(c),
                Err(_) => break,
            }
        }
        commit_batch(db, batch);
    }
}

/// Applies `batch` in order in one transaction and commits it; a change
/// that fails is answered with its error and the rest applied again
/// without it.
fn commit_batch(db: &Database, mut batch: Vec<Box<dyn Change>>) {
    while !batch.is_empty() {
        let txn = match db.begin_write() {
            Ok(t) => t,
            Err(e) => return fail_all(batch, &e.to_string()),
        };
        let failed = match Tables::open(&txn) {
            Err(e) => return fail_all(batch, &e.to_string()),
            Ok(mut tables) => batch
                .iter_mut()
                .enumerate()
                .find_map(|(i, c)| c.apply(&mut tables).err().map(|e| (i, e))),
        };
        match failed {
            None => {
                match txn.commit() {
                    Ok(()) => batch.into_iter().for_each(Change::succeed),
                    Err(e) => fail_all(batch, &e.to_string()),
                }
                return;
            }
            Some((i, e)) => {
                // Nothing of the batch stays; the failed change is answered
                // and the others go again.
                if let Err(abort) = txn.abort() {
                    return fail_all(batch, &abort.to_string());
                }
                batch.remove(i).fail(e);
            }
        }
    }
}

fn fail_all(batch: Vec<Box<dyn Change>>, why: &str) {
    for c in batch {
        c.fail(StoreError::Unavailable(Cause::msg(why.to_owned())));
    }
}
