//! `GET /api/v1/live`: the live view's Server-Sent Events (see [`luna_core::api::LiveEvent`]).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use luna_core::api::LiveEvent;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::broadcast::Receiver;

use super::{authorized, snapshot, unauthorized, TokenQuery, Web};
use crate::http::ApiError;

/// A comment line this often keeps proxies and idle-connection timers from closing the stream.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

pub(super) async fn live(State(web): State<Arc<Web>>, headers: HeaderMap, Query(q): Query<TokenQuery>) -> Response {
    if !authorized(&web.app.admin_token, &headers, &q) {
        return unauthorized();
    }
    // Subscribed before the snapshot is read: a change committed meanwhile comes after it
    // (perhaps twice, which is harmless), never lost.
    let rx = web.app.live.subscribe();
    let nodes = match snapshot(&web.app.service).await {
        Ok(n) => n,
        Err(e) => return ApiError(e).into_response(),
    };
    let mut pending = VecDeque::from([event(&LiveEvent::Snapshot(nodes))]);
    if let Some(stats) = web.latest() {
        pending.push_back(event(&LiveEvent::Stats(stats)));
    }
    let feed = Feed { web: web.clone(), rx, pending, _client: Client::new(&web) };
    let stream = futures::stream::unfold(feed, |mut feed| async move {
        let next = feed.next().await?;
        Some((Ok::<_, Infallible>(next), feed))
    });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(KEEP_ALIVE)).into_response()
}

fn event(e: &LiveEvent) -> Event {
    Event::default().event(e.name()).data(e.data())
}

struct Feed {
    web: Arc<Web>,
    rx: Receiver<Arc<LiveEvent>>,
    pending: VecDeque<Event>,
    _client: Client,
}

impl Feed {
    /// The next event; `None` ends the stream (the server is stopping).
    async fn next(&mut self) -> Option<Event> {
        if let Some(e) = self.pending.pop_front() {
            return Some(e);
        }
        match self.rx.recv().await {
            Ok(e) => Some(event(&e)),
            Err(RecvError::Closed) => None,
            Err(RecvError::Lagged(missed)) => {
                // Too slow for the changes: start again from the whole picture.
                tracing::debug!(missed, "live view client fell behind; sending a snapshot");
                match snapshot(&self.web.app.service).await {
                    Ok(nodes) => Some(event(&LiveEvent::Snapshot(nodes))),
                    Err(e) => {
                        tracing::warn!(error = %e, "live view: cannot read the nodes");
                        None
                    }
                }
            }
        }
    }
}

/// Counts open streams (`luna_live_clients`) while it lives.
struct Client(Arc<crate::metrics::Metrics>);

impl Client {
    fn new(web: &Web) -> Client {
        web.app.metrics.live_clients.inc();
        Client(web.app.metrics.clone())
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.0.live_clients.dec();
    }
}
