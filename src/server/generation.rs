//! One HTTP request's generations (one per choice: `n`, or several prompts) on a model's
//! engine. Events come from the engine thread through a channel; dropping a [`Generation`] (the
//! client went away, the handler was dropped) cancels whatever is still running, and the sink
//! also reports `false` once the receiver is gone, so the engine drops the sequence at its next
//! step either way.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use super::error::ApiError;
use super::metrics::{Metrics, RequestTimer};
use super::registry::Lease;
use crate::engine::generate::FinishReason;
use crate::engine::request::{EventSink, GenerationRequest, SeqEvent};
use crate::engine::scheduler::{Collected, RequestId};
use crate::engine::session::ModelSession;

pub struct Generation {
    rx: UnboundedReceiver<(usize, SeqEvent)>,
    /// Engine ids of the choices still running.
    ids: Vec<Option<RequestId>>,
    open: usize,
    lease: Lease,
    session: Arc<ModelSession>,
    metrics: Arc<Metrics>,
    pub started: Instant,
}

impl Generation {
    /// Submits every request; refused as a whole (nothing left running) when one is refused.
    pub fn submit(
        lease: Lease,
        requests: Vec<GenerationRequest>,
        metrics: &Arc<Metrics>,
    ) -> Result<Generation, ApiError> {
        let (tx, rx) = unbounded_channel();
        let engine = lease.model.engine()?.clone();
        let session = engine.session().clone();
        let mut ids = Vec::with_capacity(requests.len());
        let started = Instant::now();
        for (index, request) in requests.into_iter().enumerate() {
            let tx = tx.clone();
            let mut timer = RequestTimer::new(metrics.clone(), &lease.model.key, started);
            let sink: EventSink = Box::new(move |event| {
                timer.observe(&event);
                tx.send((index, event)).is_ok()
            });
            match engine.submit(request, sink) {
                Ok(id) => ids.push(Some(id)),
                Err(e) => {
                    for id in ids.iter().flatten() {
                        engine.cancel(*id);
                    }
                    if matches!(e, crate::engine::request::SubmitError::Overloaded { .. }) {
                        metrics.rejected(&lease.model.key);
                    }
                    return Err(e.into());
                }
            }
        }
        let open = ids.len();
        metrics.generation_opened();
        Ok(Generation {
            rx,
            ids,
            open,
            lease,
            session,
            metrics: metrics.clone(),
            started,
        })
    }

    pub fn session(&self) -> &Arc<ModelSession> {
        &self.session
    }

    pub fn lease(&self) -> &Lease {
        &self.lease
    }

    pub fn choices(&self) -> usize {
        self.ids.len()
    }

    /// The next event of any choice; `None` once every choice has finished.
    pub async fn next(&mut self) -> Option<(usize, SeqEvent)> {
        if self.open == 0 {
            return None;
        }
        let (index, event) = self.rx.recv().await?;
        if matches!(event, SeqEvent::Finished { .. } | SeqEvent::Failed(_))
            && self.ids[index].take().is_some()
        {
            self.open -= 1;
        }
        Some((index, event))
    }

    /// Waits for every choice and returns what each produced; a failed or cancelled choice is
    /// an error.
    pub async fn collect(mut self) -> Result<Vec<Collected>, ApiError> {
        let mut out = vec![Collected::default(); self.choices()];
        while let Some((i, event)) = self.next().await {
            out[i].push(event);
        }
        for c in &out {
            if let Some(e) = &c.error {
                return Err(ApiError::internal(format!("generation failed: {e}")));
            }
            if c.finish == Some(FinishReason::Cancelled) || c.finish.is_none() {
                return Err(ApiError::unavailable(
                    "the request was cancelled (the server is shutting down)",
                    5,
                ));
            }
        }
        Ok(out)
    }
}

impl Drop for Generation {
    fn drop(&mut self) {
        if let Ok(engine) = self.lease.model.engine() {
            for id in self.ids.iter().flatten() {
                engine.cancel(*id);
            }
        }
        self.metrics.generation_closed();
    }
}
