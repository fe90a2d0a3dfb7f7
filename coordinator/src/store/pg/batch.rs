//! Group commit for the lease hot path: concurrent calls share one statement.
//!
//! Under load, what a claim or a completion costs the database is mostly per statement, not
//! per row: the round trip, a snapshot, starting the executor, a commit with its WAL flush.
//! So calls queue here and a few runners take whatever is queued, up to a batch size, and
//! send it as one statement. A quiet store sends a call alone at once, so batching adds no
//! waiting; under load the batches grow by themselves while earlier ones run. Used by
//! `claims.rs` and `completions.rs`.

use std::future::Future;
use std::sync::Arc;

use sqlx::postgres::PgPool;
use tokio::sync::{mpsc, oneshot, Mutex};

use crate::store::StoreError;

/// One queued call and where its answer goes.
struct Queued<J, A> {
    job: J,
    reply: oneshot::Sender<Result<A, StoreError>>,
}

/// A queue of calls of one kind (jobs `J`, answers `A`) and its runners.
pub(crate) struct Batcher<J, A> {
    name: &'static str,
    sender: mpsc::UnboundedSender<Queued<J, A>>,
}

impl<J, A> Clone for Batcher<J, A> {
    fn clone(&self) -> Self {
        Batcher {
            name: self.name,
            sender: self.sender.clone(),
        }
    }
}

impl<J, A> std::fmt::Debug for Batcher<J, A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batcher").field("name", &self.name).finish()
    }
}

impl<J: Send + 'static, A: Send + 'static> Batcher<J, A> {
    /// Starts `runners` runners on the current tokio runtime. Each takes up to `max_batch`
    /// queued jobs and passes them to `run`, which answers one result per job, in order (or
    /// fails the whole batch). The runners stop when the last handle is dropped.
    pub(crate) fn start<F, Fut>(
        name: &'static str,
        runners: usize,
        max_batch: usize,
        pool: PgPool,
        run: F,
    ) -> Batcher<J, A>
    where
        F: Fn(PgPool, Vec<J>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Vec<Result<A, StoreError>>, StoreError>> + Send + 'static,
    {
        let (sender, receiver) = mpsc::unbounded_channel();
        let receiver = Arc::new(Mutex::new(receiver));
        let run = Arc::new(run);
        for _ in 0..runners {
            let (receiver, run, pool) = (Arc::clone(&receiver), Arc::clone(&run), pool.clone());
            tokio::spawn(async move {
                while let Some(batch) = take(&receiver, max_batch).await {
                    let (jobs, replies): (Vec<J>, Vec<_>) =
                        batch.into_iter().map(|q| (q.job, q.reply)).unzip();
                    let count = jobs.len();
                    let answers = match run(pool.clone(), jobs).await {
                        Ok(answers) if answers.len() == count => answers,
                        Ok(answers) => {
                            let error = StoreError::Database(format!(
                                "{name}: {} answers for {count} calls",
                                answers.len()
                            ));
                            (0..count).map(|_| Err(error.clone())).collect()
                        }
                        Err(error) => (0..count).map(|_| Err(error.clone())).collect(),
                    };
                    for (reply, answer) in replies.into_iter().zip(answers) {
                        // A caller that gave up is not waiting; what its call did stands
                        // (a lease it never saw expires, as a lost worker's does).
                        let _ = reply.send(answer);
                    }
                }
            });
        }
        Batcher { name, sender }
    }

    /// Queues `job` and waits for its answer.
    pub(crate) async fn call(&self, job: J) -> Result<A, StoreError> {
        let stopped = || StoreError::Unavailable(format!("the {} queue has stopped", self.name));
        let (reply, answer) = oneshot::channel();
        self.sender
            .send(Queued { job, reply })
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

/// Waits for the first queued call, then takes whatever else is queued, up to `max_batch`;
/// `None` once every handle is gone.
async fn take<J, A>(
    receiver: &Mutex<mpsc::UnboundedReceiver<Queued<J, A>>>,
    max_batch: usize,
) -> Option<Vec<Queued<J, A>>> {
    let mut receiver = receiver.lock().await;
    let first = receiver.recv().await?;
    let mut batch = vec![first];
    while batch.len() < max_batch {
        match receiver.try_recv() {
            Ok(queued) => batch.push(queued),
            Err(_) => break,
        }
    }
    Some(batch)
}
