//! `kind = "mqtt"`: subscribe to a broker (rumqttc, MQTT 3.1.1) and acknowledge each QoS 1
//! message only once what it produced is committed (DESIGN.md, guarantee 2).
//!
//! Two tasks per source:
//! - the **connection** task owns rumqttc's event loop and polls it at all times (keep-alive
//!   pings, acknowledgements going out), hands each publish to the decoder over a bounded
//!   channel, and on any failure drops the connection and makes a new client after a capped,
//!   jittered backoff. The session is persistent (clean session off, a client id that is the
//!   same at every start), so the broker keeps messages for scangate while it is away;
//! - the **decoder** task decodes each payload, hands its reads to the pipeline (waiting while
//!   it is full: the broker holds what is not acknowledged), and keeps each message until the
//!   spool thread reports the commit of its last read ([`Settled`]); then acknowledges, in the
//!   order the broker sent them, as MQTT asks.
//!
//! A message's reads carry its position (a per-source counter, [`SourceRead::journal_end`]);
//! all but its last carry `frame_more`, so a commit group never ends inside a message.
//! Messages without reads (heartbeats, bad payloads, oversize ones) are acknowledged as soon as
//! every message before them is. Messages of an earlier connection are never acknowledged on a
//! later one (the broker sends them again, and packet ids are reused): their reads may repeat,
//! never go missing. When the spool refuses a group (full with `when_full = "reject"`, disk
//! full), its messages stay unacknowledged and are handed over again every second.

use super::journal::Settled;
use super::{Feed, SourceRead};
use crate::config::{MqttSource, PayloadProtocol, SourceConfig};
use crate::metrics::LogThrottle;
use crate::protocol::payload::Item;
use crate::protocol::{decode_at_most, Decoded, Protocol};
use backon::BackoffBuilder;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, Publish, QoS};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Messages the connection task may hand over ahead of the decoder. Beyond it the connection
/// waits (TCP pushes back on the broker).
const HANDOFF: usize = 16;

/// Payload bytes held unacknowledged (waiting for their commit) before the decoder stops
/// taking messages (one larger message is still taken alone).
const UNACKED_MAX_BYTES: usize = 16 << 20;

/// Messages held unacknowledged before the decoder stops taking more, beyond twice the
/// broker's window: mosquitto sends a resumed session's queue well past its
/// `max_inflight_messages` (13,000 unacknowledged seen with a window of 1,000), and every held
/// message pins its payload and the read buffer it came in.
const UNACKED_EXTRA: usize = 1024;

/// Publishes the connection task keeps for the decoder while it keeps polling the broker:
/// by count and by payload bytes (payloads above `max_payload_bytes` are not kept).
const OVERFLOW_MAX: usize = 8192;
const OVERFLOW_MAX_BYTES: usize = 4 << 20;

/// A connection that has lasted this long is working: the reconnect backoff starts small
/// again.
const STABLE_AFTER: Duration = Duration::from_secs(30);

/// Most reads one message may give (a stream protocol's payload of short lines, a reader
/// batch): beyond it the rest of the message is counted (`too_many_reads`) and not read. A
/// message's reads are committed together, so this also bounds one commit group.
pub const MESSAGE_READS_MAX: usize = 100_000;

/// Most bytes of reads (as the read channel counts them) one message may give.
pub const MESSAGE_READ_BYTES_MAX: usize = 8 << 20;

/// How long a refused message waits before it is handed over again.
const RESEND_AFTER: Duration = Duration::from_secs(1);

/// A reader timestamp more than this far ahead of the gateway's clock is not used.
const READER_AHEAD_MAX_MS: i64 = 60_000;

/// The client id when the config sets none: the same at every start (the broker's session is
/// keyed by it), different for every gateway and source.
pub fn default_client_id(gateway_id: &str, source: &str) -> String {
    format!("scangate-{gateway_id}-{source}")
}

/// Everything the decoder needs from the pipeline's wiring.
pub struct Wiring {
    /// The spool thread's reports of settled groups for this source.
    pub settled: mpsc::UnboundedReceiver<Settled>,
    /// The last position the spool recorded for this source (positions continue above it).
    pub start_pos: u64,
    /// Set to make the ingest stage end its group now (the broker's window is half used).
    pub commit_now: Arc<AtomicBool>,
    pub gateway_id: Arc<str>,
}

/// One message received and not yet acknowledged.
struct Held {
    publish: Publish,
    /// The connection it came on (only that one may acknowledge it).
    conn: u64,
    /// Position of its last read; 0 when it has no read to wait for.
    pos: u64,
    /// The spool refused its reads: to be handed over again.
    refused: bool,
    /// Its payload's length as received.
    size: usize,
}

/// Run the source until `shutdown`. Returns the receiver of settled positions and the last
/// position handed over (for a start again, see [`super::SettledReceivers`]).
pub async fn run(
    cfg: &SourceConfig,
    m: &MqttSource,
    feed: Feed,
    wiring: Wiring,
    shutdown: CancellationToken,
) -> (mpsc::UnboundedReceiver<Settled>, u64) {
    let client_id = m
        .client_id
        .clone()
        .unwrap_or_else(|| default_client_id(&wiring.gateway_id, &cfg.name));
    let (tx, rx) = mpsc::channel::<(u64, Publish, usize)>(HANDOFF);
    let client: Arc<std::sync::Mutex<Option<(u64, AsyncClient)>>> = Arc::default();
    let decoder_done = CancellationToken::new();
    let conn = tokio::spawn(connection(
        cfg.name.clone(),
        m.clone(),
        client_id.clone(),
        feed.clone(),
        tx,
        client.clone(),
        decoder_done.clone(),
    ));
    tracing::info!(source = %cfg.name, broker = %format!("{}:{}", m.host, m.port), client_id = %client_id, topics = m.topics.len(), "MQTT source starting (persistent session, QoS {})", m.qos);
    let mut d = Decoder::new(cfg, m, feed, wiring, client);
    d.run(rx, &shutdown).await;
    decoder_done.cancel();
    let _ = conn.await;
    (d.settled, d.next_pos.saturating_sub(1))
}

struct Decoder {
    name: Arc<str>,
    m: MqttSource,
    feed: Feed,
    settled: mpsc::UnboundedReceiver<Settled>,
    commit_now: Arc<AtomicBool>,
    client: Arc<std::sync::Mutex<Option<(u64, AsyncClient)>>>,
    held: VecDeque<Held>,
    held_bytes: usize,
    /// Acknowledgements of settled messages not yet passed to the connection: (connection,
    /// packet id).
    acks: VecDeque<(u64, u16)>,
    /// See [`UNACKED_EXTRA`].
    held_max: usize,
    /// Messages handed over and not yet committed (for `commit_now`).
    waiting: usize,
    next_pos: u64,
    committed: u64,
    /// Stream decoders, one per topic using one (reset for every payload).
    streams: Vec<Option<Protocol>>,
    bad: LogThrottle,
    big: LogThrottle,
    clock: LogThrottle,
    resend_at: Option<tokio::time::Instant>,
    /// The decoder's progress, for the watchdog (`crate::service::progress`).
    beat: Arc<crate::service::progress::Beat>,
}

impl Decoder {
    fn new(
        cfg: &SourceConfig,
        m: &MqttSource,
        feed: Feed,
        wiring: Wiring,
        client: Arc<std::sync::Mutex<Option<(u64, AsyncClient)>>>,
    ) -> Self {
        Decoder {
            beat: feed.metrics.progress.beat(&format!("source {}", cfg.name)),
            name: Arc::from(cfg.name.as_str()),
            m: m.clone(),
            streams: m
                .topics
                .iter()
                .map(|t| match &t.payload {
                    PayloadProtocol::Stream(p) => Some(Protocol::new(p)),
                    _ => None,
                })
                .collect(),
            feed,
            settled: wiring.settled,
            commit_now: wiring.commit_now,
            client,
            held: VecDeque::new(),
            held_bytes: 0,
            acks: VecDeque::new(),
            held_max: 2 * m.broker_max_inflight + UNACKED_EXTRA,
            waiting: 0,
            next_pos: wiring.start_pos + 1,
            committed: wiring.start_pos,
            bad: LogThrottle::new(Duration::from_secs(10)),
            big: LogThrottle::new(Duration::from_secs(10)),
            clock: LogThrottle::new(Duration::from_secs(60)),
            resend_at: None,
        }
    }

    async fn run(
        &mut self,
        mut rx: mpsc::Receiver<(u64, Publish, usize)>,
        shutdown: &CancellationToken,
    ) {
        let mut ack_retry = tokio::time::interval(Duration::from_millis(20));
        ack_retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let resend = self.resend_at;
            // Waiting for messages, commits or a timer.
            self.beat.idle();
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                s = self.settled.recv() => match s {
                    Some(s) => self.on_settled(s),
                    None => break,
                },
                msg = rx.recv(), if self.held_bytes < UNACKED_MAX_BYTES && self.held.len() < self.held_max => match msg {
                    Some((conn, p, size)) => {
                        if !self.on_message(conn, p, size).await {
                            break;
                        }
                    }
                    None => break,
                },
                _ = async { tokio::time::sleep_until(resend.unwrap_or_else(tokio::time::Instant::now)).await }, if resend.is_some() => {
                    self.resend_at = None;
                    if !self.resend().await {
                        break;
                    }
                }
                _ = ack_retry.tick(), if !self.held.is_empty() || !self.acks.is_empty() => {}
            }
            self.beat.busy();
            self.beat.fault_point().await;
            self.ack_ready();
        }
        self.beat.retire();
        // Stopping: what was handed over is committed by the ingest stage's last groups;
        // acknowledge it before going (else the broker sends it again at the next start).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while self
            .held
            .iter()
            .any(|h| h.pos > self.committed && !h.refused)
        {
            self.feed.wake.notify_one();
            match tokio::time::timeout_at(deadline, self.settled.recv()).await {
                Ok(Some(s)) => self.on_settled(s),
                _ => break,
            }
            self.ack_ready();
        }
        self.ack_ready();
        // Acknowledgements the connection had no room for yet.
        while !self.acks.is_empty() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
            self.ack_ready();
        }
        self.feed.metrics.mqtt_unacked.sub(self.held.len() as u64);
        if !self.held.is_empty() {
            tracing::info!(source = %self.name, messages = self.held.len(), "MQTT messages not yet committed stay unacknowledged: the broker sends them again at the next start");
        }
        let client = self
            .client
            .lock()
            .ok()
            .and_then(|c| c.as_ref().map(|(_, c)| c.clone()));
        if let Some(c) = client {
            let _ = c.try_disconnect();
        }
    }

    fn on_settled(&mut self, s: Settled) {
        match s {
            Settled::Committed(p) => {
                self.committed = self.committed.max(p);
            }
            Settled::Refused(p) => {
                let mut n = 0;
                for h in self.held.iter_mut() {
                    if h.pos > self.committed && h.pos <= p && !h.refused {
                        h.refused = true;
                        n += 1;
                    }
                }
                if n > 0 {
                    self.waiting = self.waiting.saturating_sub(n);
                    self.resend_at = Some(tokio::time::Instant::now() + RESEND_AFTER);
                    tracing::warn!(source = %self.name, messages = n, "The spool refused reads of MQTT messages (full or disk full): they stay unacknowledged (the broker keeps the rest) and are handed over again in {RESEND_AFTER:?}");
                }
            }
        }
        self.waiting = self
            .held
            .iter()
            .filter(|h| h.pos > self.committed && !h.refused)
            .count();
    }

    /// Release, from the front, every message that is settled, queueing its acknowledgement;
    /// then pass queued acknowledgements to the connection.
    fn ack_ready(&mut self) {
        let current = self.client.lock().ok().and_then(|c| c.clone());
        while let Some(h) = self.held.pop_front() {
            // A message of an earlier connection is sent again by the broker (and its packet
            // id may be reused by now): it is never acknowledged here.
            let stale = current.as_ref().is_none_or(|(conn, _)| *conn != h.conn);
            let unsettled = h.refused || h.pos > self.committed;
            if !stale && unsettled {
                self.held.push_front(h);
                break;
            }
            if !stale && h.publish.qos != QoS::AtMostOnce {
                self.acks.push_back((h.conn, h.publish.pkid));
            }
            if unsettled && !h.refused {
                self.waiting = self.waiting.saturating_sub(1);
            }
            self.held_bytes -= h.publish.payload.len();
            self.feed.metrics.mqtt_unacked.sub(1);
        }
        // The acknowledgements wait here, not the messages: a held message would stop the
        // decoder taking more, which stops the connection task polling, which is what sends
        // the acknowledgements (rumqttc sends requests from its poll). At most one per packet
        // id, two bytes each.
        while let Some(&(conn, pkid)) = self.acks.front() {
            match &current {
                Some((c, client)) if *c == conn => {
                    let mut p = Publish::new("", QoS::AtLeastOnce, Vec::new());
                    p.pkid = pkid;
                    if client.try_ack(&p).is_err() {
                        // Its request queue is full: again at the next wake.
                        break;
                    }
                    self.feed.metrics.mqtt_acked.inc();
                }
                // The connection it came on is gone: the broker sends the message again.
                _ => {}
            }
            self.acks.pop_front();
        }
    }

    /// Handle one message; false once the pipeline is gone.
    /// `size`: the payload's length as received (a payload above `max_payload_bytes` arrives
    /// emptied by the connection task).
    async fn on_message(&mut self, conn: u64, p: Publish, size: usize) -> bool {
        let metrics = &self.feed.metrics;
        metrics.mqtt_messages.inc();
        metrics.mqtt_unacked.add(1);
        metrics.bytes_in.add(size as u64);
        self.feed.health.bytes.add(size as u64);
        if p.dup {
            metrics.mqtt_redelivered.inc();
        }
        self.held_bytes += p.payload.len();
        let mut h = Held {
            publish: p,
            conn,
            pos: 0,
            refused: false,
            size,
        };
        let ok = self.hand_over(&mut h, false).await;
        // Not to be decoded again (nothing to wait for, or a payload not read): its payload
        // need not be held until its turn to be acknowledged.
        if h.pos == 0 {
            self.held_bytes -= h.publish.payload.len();
            h.publish.payload = bytes::Bytes::new();
        }
        self.held.push_back(h);
        ok
    }

    /// Decode a held message and hand its reads over, setting its position.
    async fn hand_over(&mut self, h: &mut Held, resent: bool) -> bool {
        let now = crate::event::wall_now_ms();
        let p = &h.publish;
        if h.size > self.m.max_payload_bytes {
            self.feed.metrics.count_drop("payload_too_large", 1);
            self.feed.health.bad_frame("payload_too_large");
            if let Some(held) = self.big.allow() {
                tracing::warn!(source = %self.name, topic = %p.topic, bytes = h.size, max_payload_bytes = self.m.max_payload_bytes, similar_not_logged = held, "MQTT payload above max_payload_bytes: counted and acknowledged without decoding (raise max_payload_bytes if the reader's batches are this large)");
            }
            h.pos = 0;
            return true;
        }
        // A retained message is the broker's copy of an old one, sent again at every
        // subscription: not a read happening now (a phantom tag read, a stale sensor value).
        if p.retain {
            self.feed.health.other_frame("retained");
            tracing::debug!(source = %self.name, topic = %p.topic, "Retained MQTT message skipped (not a live read)");
            h.pos = 0;
            return true;
        }
        // The most specific configured filter that matches; none: a subscription the
        // persistent session kept from an earlier config (the broker does not forget it).
        let Some(topic) = most_specific(&self.m.topics, &p.topic) else {
            self.feed.metrics.count_drop("unsubscribed_topic", 1);
            self.feed.health.bad_frame("unsubscribed_topic");
            if let Some(held) = self.bad.allow() {
                tracing::warn!(source = %self.name, topic = %p.topic, similar_not_logged = held, "MQTT message on a topic no configured filter matches: the broker keeps this session's subscriptions from an earlier config. Counted and acknowledged; to end it, remove the session at the broker (or change client_id)");
            }
            h.pos = 0;
            return true;
        };
        let mut items: Vec<Item> = Vec::new();
        match self.m.topics.get(topic).map(|t| &t.payload) {
            Some(PayloadProtocol::ImpinjIot) => {
                crate::protocol::impinj_iot::decode(&p.payload, &mut items)
            }
            Some(PayloadProtocol::ZebraIotc) => {
                crate::protocol::zebra_iotc::decode(&p.payload, &mut items)
            }
            Some(PayloadProtocol::Json(map)) => map.decode(&p.payload, &mut items),
            Some(PayloadProtocol::Stream(_)) | None => {
                if let Some(Some(proto)) = self.streams.get_mut(topic) {
                    let (decoded, left) =
                        decode_at_most(proto, &p.payload, true, MESSAGE_READS_MAX);
                    items.extend(decoded.into_iter().map(|decoded| Item {
                        decoded,
                        reader_ms: None,
                    }));
                    if left > 0 {
                        items.push(Item::skipped("too_many_reads", left));
                    }
                    // The next payload starts afresh (no partial frame carried over).
                    if let Some(PayloadProtocol::Stream(c)) =
                        self.m.topics.get(topic).map(|t| &t.payload)
                    {
                        *proto = Protocol::new(c);
                    }
                }
            }
        }
        let mut reads: Vec<SourceRead> = Vec::with_capacity(items.len().min(MESSAGE_READS_MAX));
        let mut skipped: Option<&'static str> = None;
        let mut read_bytes = 0usize;
        for it in items {
            if let Decoded::Skipped { reason, .. } = it.decoded {
                skipped.get_or_insert(reason);
            }
            if matches!(it.decoded, Decoded::Read(_))
                && (reads.len() >= MESSAGE_READS_MAX || read_bytes >= MESSAGE_READ_BYTES_MAX)
            {
                self.feed.metrics.count_drop("too_many_reads", 1);
                skipped.get_or_insert("too_many_reads");
                continue;
            }
            let wall = match it.reader_ms {
                Some(r) if self.m.reader_clock => {
                    if crate::clock::plausible(r) && r <= now + READER_AHEAD_MAX_MS {
                        r
                    } else {
                        self.feed.metrics.reader_clock_rejected.inc();
                        if let Some(held) = self.clock.allow() {
                            tracing::warn!(source = %self.name, reader_time = %crate::event::rfc3339_ms(r), similar_not_logged = held, "A reader's timestamp is implausible (reader clock not synced, or ahead of the gateway): the gateway's clock stamps its reads. Set up NTP on the reader");
                        }
                        now
                    }
                }
                _ => now,
            };
            if let Some(r) = self.feed.read_of(it.decoded, wall, 0) {
                read_bytes += r.size();
                reads.push(r);
            }
        }
        if let Some(reason) = skipped {
            if let Some(held) = self.bad.allow() {
                tracing::warn!(source = %self.name, topic = %p.topic, reason, bytes = p.payload.len(), similar_not_logged = held, "MQTT payload (or part of it) is not what its protocol expects: counted in scangate_dropped_total and acknowledged");
            }
        }
        if reads.is_empty() {
            h.pos = 0;
            return true;
        }
        let pos = self.next_pos;
        self.next_pos += 1;
        h.pos = pos;
        let last = reads.len() - 1;
        // Waiting for room in the read channel: the ingest stage is checked on its own.
        self.beat.idle();
        for (i, mut r) in reads.into_iter().enumerate() {
            r.frame_more = i < last;
            r.resent = resent;
            r.journal_end = if i < last { pos - 1 } else { pos };
            if !self.feed.send(r).await {
                return false;
            }
        }
        self.beat.busy();
        self.waiting += 1;
        // Commit now when half the broker's window waits, or half of what this source may
        // hold: waiting for the commit interval would stall the broker (or this source).
        if self.waiting * 2 >= self.m.broker_max_inflight
            || self.held_bytes * 2 >= UNACKED_MAX_BYTES
            || self.held.len() * 2 >= self.held_max
        {
            self.commit_now.store(true, Ordering::Release);
            self.feed.wake.notify_one();
        }
        true
    }

    /// Hand over again the messages whose reads the spool refused.
    async fn resend(&mut self) -> bool {
        let mut held = std::mem::take(&mut self.held);
        let mut ok = true;
        let mut n = 0;
        for h in held.iter_mut().filter(|h| h.refused) {
            h.refused = false;
            n += 1;
            if ok && !self.hand_over(h, true).await {
                ok = false;
            }
        }
        self.held = held;
        self.feed.metrics.mqtt_resent.add(n);
        ok
    }
}

/// Keep a connection to the broker: connect, subscribe, pass publishes on, and after any
/// failure start over with a new client after a backoff. Ends when the decoder is done.
async fn connection(
    name: String,
    m: MqttSource,
    client_id: String,
    feed: Feed,
    tx: mpsc::Sender<(u64, Publish, usize)>,
    current: Arc<std::sync::Mutex<Option<(u64, AsyncClient)>>>,
    done: CancellationToken,
) {
    let mut backoff = new_backoff(&m);
    let mut conn: u64 = 0;
    let mut failures = LogThrottle::new(Duration::from_secs(60));
    let qos = if m.qos == 0 {
        QoS::AtMostOnce
    } else {
        QoS::AtLeastOnce
    };
    while !done.is_cancelled() {
        conn += 1;
        let opts = match options(&name, &m, &client_id) {
            Ok(o) => o,
            Err(e) => {
                feed.health.set_error(Some(e.clone()));
                tracing::error!(source = %name, error = %e, "MQTT source cannot connect until this is fixed");
                pause(&mut backoff, &m, &done).await;
                continue;
            }
        };
        let (client, mut eventloop) = AsyncClient::new(opts, 10_000);
        if let Ok(mut c) = current.lock() {
            *c = Some((conn, client.clone()));
        }
        let mut up = false;
        // Publishes not yet taken by the decoder: the event loop is polled meanwhile (keep-
        // alives, acknowledgements going out) until this holds OVERFLOW_MAX_BYTES or
        // OVERFLOW_MAX messages; only then does reading stop (TCP pushes back on the broker).
        let mut overflow: VecDeque<(u64, Publish, usize)> = VecDeque::new();
        let mut overflow_bytes = 0usize;
        let mut stalled = LogThrottle::new(Duration::from_secs(60));
        let connected_at = tokio::time::Instant::now();
        let mut stable = false;
        let reason = loop {
            // A connection is working (the backoff starts small again) once it has lasted,
            // not at its CONNACK: a message it cannot read (above the packet limit) drops
            // each new connection after whatever came before it.
            if !stable && up && connected_at.elapsed() >= STABLE_AFTER {
                stable = true;
                backoff = new_backoff(&m);
            }
            let room = overflow_bytes < OVERFLOW_MAX_BYTES && overflow.len() < OVERFLOW_MAX;
            if !room {
                if let Some(held) = stalled.allow() {
                    tracing::warn!(source = %name, messages = overflow.len(), similar_not_logged = held, "MQTT messages arrive faster than they are committed: reading from the broker pauses (if it lasts beyond 1.5 × keep_alive_s the broker drops the connection; unacknowledged messages come again)");
                }
            }
            let ev = tokio::select! {
                _ = done.cancelled() => {
                    send_last_requests(&mut eventloop).await;
                    break None;
                }
                permit = tx.reserve(), if !overflow.is_empty() => {
                    match permit {
                        Ok(permit) => {
                            if let Some((c, p, size)) = overflow.pop_front() {
                                overflow_bytes -= p.payload.len();
                                permit.send((c, p, size));
                            }
                        }
                        // The decoder has ended (it may end a moment before `done`): its
                        // last acknowledgements and the disconnect still go out.
                        Err(_) => {
                            send_last_requests(&mut eventloop).await;
                            break None;
                        }
                    }
                    continue;
                }
                ev = eventloop.poll(), if room => ev,
            };
            match ev {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    up = true;
                    feed.metrics.mqtt_connects.inc();
                    feed.metrics.sources_connected.add(1);
                    feed.health.set_connected(true, crate::event::wall_now_ms());
                    feed.health.set_error(None);
                    feed.health.reopens.inc();
                    tracing::info!(source = %name, session_present = ack.session_present, "MQTT connected");
                    let subs: Vec<rumqttc::SubscribeFilter> = m
                        .topics
                        .iter()
                        .map(|t| rumqttc::SubscribeFilter::new(t.filter.clone(), qos))
                        .collect();
                    if let Err(e) = client.try_subscribe_many(subs) {
                        break Some(format!("cannot subscribe: {e}"));
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    for (t, code) in m.topics.iter().zip(&ack.return_codes) {
                        if matches!(code, rumqttc::SubscribeReasonCode::Failure) {
                            let e = format!(
                                "the broker refused the subscription to \"{}\" (its ACL?)",
                                t.filter
                            );
                            tracing::error!(source = %name, topic = %t.filter, "MQTT broker refused the subscription: check the broker's ACL for this user and client id");
                            feed.health.set_error(Some(e));
                        }
                    }
                }
                Ok(Event::Incoming(Packet::Publish(mut p))) => {
                    // Too large to decode: only its size is kept (not 64 MiB per queued
                    // message); the decoder counts it and acknowledges it.
                    let size = p.payload.len();
                    if size > m.max_payload_bytes {
                        p.payload = bytes::Bytes::new();
                    }
                    overflow_bytes += p.payload.len();
                    overflow.push_back((conn, p, size));
                }
                Ok(_) => {}
                Err(e) => break Some(describe(&e, &m)),
            }
        };
        if let Ok(mut c) = current.lock() {
            *c = None;
        }
        if up {
            feed.metrics.sources_connected.sub(1);
            feed.health
                .set_connected(false, crate::event::wall_now_ms());
        }
        let Some(reason) = reason else { break };
        feed.health.set_error(Some(reason.clone()));
        if let Some(held) = failures.allow() {
            tracing::warn!(source = %name, broker = %format!("{}:{}", m.host, m.port), error = %reason, similar_not_logged = held, "MQTT connection failed or lost; reconnecting with backoff (unacknowledged messages come again)");
        } else {
            tracing::debug!(source = %name, error = %reason, "MQTT connection failed");
        }
        pause(&mut backoff, &m, &done).await;
    }
}

/// The decoder has ended: the requests it queued (the acknowledgements of what was committed,
/// then a DISCONNECT) are sent, and the broker is given the time to read them and close the
/// connection itself (MQTT 3.1.1, 3.14), within 1 s. Without this, the broker would send those
/// messages again to the next run, as new reads: dropped before it, the connection could lose
/// what was written; and a next run connecting at once takes the session over (the broker
/// drops the old connection with whatever of it was still unread).
async fn send_last_requests(eventloop: &mut rumqttc::EventLoop) {
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        // Until the broker closes the connection after the DISCONNECT (or it broke before).
        // Publishes arriving meanwhile are not taken: never acknowledged, they come again.
        while eventloop.poll().await.is_ok() {}
    })
    .await;
}

/// The index of the most specific topic filter matching `topic`: the most levels named
/// exactly, then the fewest `+`, a filter without `#` before one with it.
fn most_specific(topics: &[crate::config::MqttTopic], topic: &str) -> Option<usize> {
    topics
        .iter()
        .enumerate()
        .filter(|(_, t)| rumqttc::matches(topic, &t.filter))
        .max_by_key(|(i, t)| {
            let levels = t.filter.split('/');
            let exact = levels.clone().filter(|l| *l != "+" && *l != "#").count();
            let plus = levels.clone().filter(|l| *l == "+").count();
            let hash = t.filter.ends_with('#');
            // Earlier listed wins a tie.
            (exact, std::cmp::Reverse(plus), !hash, std::cmp::Reverse(*i))
        })
        .map(|(i, _)| i)
}

fn new_backoff(m: &MqttSource) -> backon::ExponentialBackoff {
    backon::ExponentialBuilder::default()
        .with_min_delay(m.reconnect_min)
        .with_max_delay(m.reconnect_max)
        .with_jitter()
        .without_max_times()
        .build()
}

async fn pause(backoff: &mut backon::ExponentialBackoff, m: &MqttSource, done: &CancellationToken) {
    let d = backoff.next().unwrap_or(m.reconnect_max);
    tokio::select! {
        _ = done.cancelled() => {}
        _ = tokio::time::sleep(d) => {}
    }
}

/// What went wrong, in words naming the fix.
fn describe(e: &rumqttc::ConnectionError, m: &MqttSource) -> String {
    use rumqttc::{ConnectReturnCode as C, ConnectionError as E};
    match e {
        E::ConnectionRefused(C::BadUserNamePassword) => {
            "the broker refused the user name or password: check `username` and `password_file`".into()
        }
        // mosquitto answers a wrong password with this code too.
        E::ConnectionRefused(C::NotAuthorized) => {
            "the broker refused the user name or password, or this client (not authorized): check `username` and `password_file`, and the broker's ACL for this `client_id`".into()
        }
        E::ConnectionRefused(C::BadClientId) => "the broker refused the client id: set `client_id`".into(),
        E::ConnectionRefused(code) => format!("the broker refused the connection: {code:?}"),
        E::MqttState(rumqttc::StateError::Deserialization(rumqttc::Error::PayloadSizeLimitExceeded(n))) => format!(
            "a message of {n} bytes is larger than the {} MiB scangate reads at all: set the broker's message_size_limit below it (the message comes again after every reconnect until it is removed)",
            crate::config::MQTT_PACKET_MAX >> 20
        ),
        E::Tls(t) => format!("TLS: {t} (check `ca_file`, the client certificate, and that mqtts:// points at a TLS port)"),
        E::NetworkTimeout => format!("no answer from {}:{} within the connection timeout", m.host, m.port),
        other => other.to_string(),
    }
}

/// rumqttc options for one connection (the password file is read again at every connect).
fn options(name: &str, m: &MqttSource, client_id: &str) -> Result<MqttOptions, String> {
    let mut o = MqttOptions::new(client_id, m.host.clone(), m.port);
    o.set_clean_session(false)
        .set_manual_acks(true)
        .set_keep_alive(m.keep_alive)
        .set_max_packet_size(
            crate::config::MQTT_PACKET_MAX as usize,
            crate::config::MQTT_SUBSCRIBE_MAX + 4096,
        )
        .set_request_channel_capacity(10_000);
    if let Some(user) = &m.username {
        let password = match &m.password_file {
            Some(f) => crate::config::read_named_text(f)
                .map(|t| t.trim().to_string())
                .map_err(|e| format!("cannot read password_file {}: {e}", f.display()))?,
            None => String::new(),
        };
        o.set_credentials(user.clone(), password);
    }
    if m.tls {
        o.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(Arc::new(tls_config(m)?)),
        ));
    }
    tracing::debug!(source = %name, client_id, "MQTT options built");
    Ok(o)
}

/// The TLS settings of an `mqtts://` source. Its files are read like the config (regular
/// files of at most 1 MiB: `config::pem_certificates`), at every connect.
fn tls_config(m: &MqttSource) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    match &m.ca_file {
        Some(f) => {
            let certs = crate::config::pem_certificates("ca_file", f)?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(format!(
                    "ca_file {} holds no usable X.509 certificate",
                    f.display()
                ));
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
            if roots.is_empty() {
                return Err("no system root certificates found: set ca_file".into());
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
    match (&m.client_cert_file, &m.client_key_file) {
        (Some(c), Some(k)) => {
            let certs = crate::config::pem_certificates("client_cert_file", c)?;
            let key = crate::config::pem_private_key("client_key_file", k)?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| format!("client certificate: {e}"))
        }
        _ => Ok(builder.with_no_client_auth()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{MqttTopic, PayloadProtocol};

    fn topics(filters: &[&str]) -> Vec<MqttTopic> {
        filters
            .iter()
            .map(|f| MqttTopic {
                filter: f.to_string(),
                payload: PayloadProtocol::ImpinjIot,
            })
            .collect()
    }

    /// Overlapping filters: the most specific one decodes the message; none matching is None.
    #[test]
    fn the_most_specific_filter_wins() {
        let t = topics(&[
            "readers/#",
            "readers/zebra/+",
            "readers/+/fx",
            "#",
            "readers/zebra/fx",
        ]);
        assert_eq!(most_specific(&t, "readers/zebra/fx"), Some(4));
        assert_eq!(most_specific(&t, "readers/zebra/x"), Some(1));
        assert_eq!(most_specific(&t, "readers/impinj/fx"), Some(2));
        assert_eq!(most_specific(&t, "readers/a/b/c"), Some(0));
        assert_eq!(most_specific(&t, "other"), Some(3));
        let t = topics(&["readers/#", "readers/zebra/+"]);
        assert_eq!(most_specific(&t, "other/x"), None);
        assert_eq!(most_specific(&topics(&["a/+", "+/b"]), "a/b"), Some(0));
    }
}
