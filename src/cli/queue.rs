//! The queue side of the CLI: `consume --shared SUB` and `subscription list|describe`.
//!
//! Owns: the shared consumer loop (lease within the prefetch window, print, ack / nack / leave
//! unacked). Must not touch: broker internals.

use std::io::Write;
use std::time::{Duration, Instant};

use super::args::{ConsumeArgs, SubscriptionCommand};
use super::common::{connect, Subscription, PATTERN_REFRESH_MS};
use super::output::JsonRecord;
use crate::protocol::queue::{QueueFetchOut, QueueMessageOut, Settle};

pub fn subscription(server: &str, cmd: SubscriptionCommand) -> Result<(), String> {
    let mut c = connect(server)?;
    let (topic, sub) = match &cmd {
        SubscriptionCommand::List { topic } => (topic.clone(), None),
        SubscriptionCommand::Describe {
            topic,
            subscription,
        } => (topic.clone(), Some(subscription.clone())),
    };
    let subs = c
        .subscription_info(&topic, sub.as_deref())
        .map_err(|e| format!("reading subscriptions of {topic:?}: {e}"))?;
    let mut out = std::io::stdout().lock();
    let w = |e: std::io::Error| e.to_string();
    match cmd {
        SubscriptionCommand::List { .. } => {
            for s in subs {
                writeln!(
                    out,
                    "{} {}",
                    s.subscription,
                    if s.key_shared { "key_shared" } else { "shared" }
                )
                .map_err(w)?;
            }
        }
        SubscriptionCommand::Describe { subscription, .. } => {
            let s = subs.first().ok_or_else(|| format!("no subscription {subscription:?} on {topic:?} (it exists once a consumer used it)"))?;
            writeln!(
                out,
                "subscription {} topic {} type {}",
                s.subscription,
                s.topic,
                if s.key_shared { "key_shared" } else { "shared" }
            )
            .map_err(w)?;
            writeln!(
                out,
                "backlog {}\nin_flight {}\nredeliveries {}\ndead_lettered {}\nacked {}",
                s.backlog, s.in_flight, s.redeliveries, s.dead_lettered, s.acked
            )
            .map_err(w)?;
        }
    }
    Ok(())
}

fn print(
    out: &mut impl Write,
    a: &ConsumeArgs,
    topic: &str,
    partition: u32,
    m: &QueueMessageOut,
) -> std::io::Result<()> {
    let fields = JsonRecord {
        topic,
        partition,
        offset: m.offset,
        key: m.key.as_deref(),
        value: &m.value,
        timestamp_ms: m.timestamp_ms,
        headers: &m.headers,
    };
    fields.print(out, a, Some(m.delivery_count))
}

pub fn consume_shared(
    server: &str,
    a: &ConsumeArgs,
    sub_name: &str,
    sub: &Subscription,
) -> Result<(), String> {
    let mut c = connect(server)?;
    let prefetch = a.prefetch.max(1);
    let mut targets: Vec<(String, u32)> = Vec::new();
    let mut refreshed = Instant::now() - Duration::from_secs(3600);
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut printed = 0u64;
    let mut unsettled = 0usize; // leased and not acked (with --ack none)
    let mut idle_since = Instant::now();
    loop {
        if targets.is_empty()
            || (matches!(sub, Subscription::Pattern(_))
                && refreshed.elapsed() >= Duration::from_millis(PATTERN_REFRESH_MS))
        {
            refreshed = Instant::now();
            targets = sub
                .topics(&mut c)?
                .into_iter()
                .flat_map(|(t, n)| (0..n).map(move |p| (t.clone(), p)))
                .filter(|(_, p)| a.partition.is_none_or(|want| want == *p))
                .collect();
        }
        let wait_ms = if targets.len() == 1 { 200 } else { 20 };
        let mut got_any = false;
        for (topic, p) in &targets {
            let room = prefetch.saturating_sub(unsettled);
            let left = a
                .max
                .map(|m| m.saturating_sub(printed) as usize)
                .unwrap_or(usize::MAX);
            let credit = room.min(left);
            if credit == 0 {
                break;
            }
            let mut q = QueueFetchOut::new(topic, sub_name, *p);
            q.max_messages = credit as u32;
            q.max_wait_ms = wait_ms;
            q.key_shared = a.key_shared;
            q.ack_timeout_ms = a.ack_timeout_ms;
            q.max_deliveries = a.max_deliveries;
            q.initial_latest = a.from.as_deref() == Some("latest");
            let msgs = c
                .queue_fetch(&q)
                .map_err(|e| format!("consuming {topic:?} partition {p}: {e}"))?;
            if msgs.is_empty() {
                continue;
            }
            got_any = true;
            for m in &msgs {
                print(&mut out, a, topic, *p, m).map_err(|e| e.to_string())?;
            }
            out.flush().map_err(|e| e.to_string())?;
            printed += msgs.len() as u64;
            let offsets: Vec<u64> = msgs.iter().map(|m| m.offset).collect();
            let how = match a.ack.as_str() {
                "auto" => Some(Settle::Ack),
                "nack" => Some(Settle::Nack {
                    delay_ms: a.nack_delay_ms,
                }),
                _ => None,
            };
            match how {
                Some(h) => {
                    c.queue_settle(topic, sub_name, *p, &offsets, h)
                        .map_err(|e| format!("settling: {e}"))?;
                }
                None => unsettled += offsets.len(),
            }
            if a.max.is_some_and(|m| printed >= m) {
                return Ok(());
            }
        }
        if super::common::idle_for_long(a.idle_ms, got_any, &mut idle_since) {
            return Ok(());
        } else if !got_any && prefetch <= unsettled {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
