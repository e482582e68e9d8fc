//! Request handlers of the consumer-group coordinator and offset lookup, on the shard that
//! coordinates the group (crc32(group) mod shards) or owns the partition.
//!
//! Owns: validation of group requests and the order "durable in the state log, then applied,
//! then acknowledged" for commits (`state_log::ApplyOrder`). Must not touch: sockets.

use std::rc::Rc;

use bytes::Bytes;

use crate::protocol::VerifiedFrame;

use super::groups::{GroupError, Tp};
use super::state_log::{Restored, StateLog};
use super::Shard;
use crate::limits;
use crate::protocol::{self as proto, fb, groups as g};

use crate::router::route::coordinator_of;

fn group_error(corr: u64, e: &GroupError) -> Bytes {
    let code = match e {
        GroupError::UnknownGroup(_) => fb::ErrorCode::UnknownGroup,
        GroupError::Fenced(_) => fb::ErrorCode::FencedMember,
        GroupError::TooManyGroups(_) => fb::ErrorCode::InvalidRequest,
    };
    proto::encode_error(corr, code, &e.to_string())
}

fn invalid(corr: u64, msg: &str) -> Bytes {
    proto::encode_error(corr, fb::ErrorCode::InvalidRequest, msg)
}

impl Shard {
    fn now_session_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn partitions_of(&self) -> impl Fn(&str) -> u32 + '_ {
        move |t: &str| {
            self.meta
                .borrow()
                .get(t)
                .map(|t| t.partitions())
                .unwrap_or(0)
        }
    }

    /// Opens this shard's state log and restores the offsets of the groups it coordinates.
    pub async fn load_groups(&self, restored: &Restored) -> Result<(), String> {
        let first_seq = restored.max_seq + 1;
        let log = StateLog::open(
            &self.cfg.data_dir,
            self.id(),
            first_seq,
            self.cfg.state_compact_bytes,
        )
        .await
        .map_err(|e| format!("opening the state log of shard {}: {e}", self.id()))?;
        *self.state.borrow_mut() = Some(Rc::new(log));
        *self.restored_queues.borrow_mut() = restored.queues.clone();
        let mut c = self.coordinator.borrow_mut();
        for ((group, topic, p), (_, offset)) in &restored.offsets {
            if coordinator_of(group, self.count()) == self.id() {
                c.restore_offset(group, (topic.clone(), *p), *offset);
            }
        }
        Ok(())
    }

    /// Past its size limit, snapshots and compacts this shard's state log (one at a time).
    pub(super) async fn maybe_compact_state(&self) {
        let Some(state) = self.state.borrow().clone() else {
            return;
        };
        if self.compacting.get() || !state.needs_compaction() {
            return;
        }
        self.compacting.set(true);
        // Only when memory holds every durable change: a change durable but not yet applied
        // would be missing from the snapshot and deleted with the old segments. New changes
        // wait at the gate meanwhile; those after the snapshot get higher sequence numbers.
        self.state_order.close_gate();
        self.state_order.drained().await;
        let offsets = self.coordinator.borrow().all_offsets();
        let queues = self.queue_snapshot();
        let (chunks, before) = state.snapshot(&offsets, &queues);
        self.state_order.open_gate();
        if let Err(e) = state.compact(chunks, before).await {
            eprintln!("ringmq: shard {}: state log compaction: {e}", self.id());
        }
        self.compacting.set(false);
    }

    /// Expires members whose session timed out (called by the ticker).
    pub fn expire_members(&self) {
        let now = self.now_session_ms();
        let pof = self.partitions_of();
        self.coordinator.borrow_mut().expire(now, &pof);
    }

    pub(super) async fn group_request(&self, corr: u64, frame: VerifiedFrame) -> Bytes {
        let f = frame.view();
        match f.body_type() {
            fb::Body::JoinGroup => self.join_group(corr, &frame),
            fb::Body::Heartbeat => {
                let Some(h) = f.body_as_heartbeat() else {
                    return invalid(corr, "not a heartbeat");
                };
                let now = self.now_session_ms();
                let pof = self.partitions_of();
                let r = self.coordinator.borrow_mut().heartbeat(
                    h.group(),
                    h.member_id(),
                    h.generation(),
                    now,
                    &pof,
                );
                match r {
                    Ok(a) => g::encode_group_assignment(corr, &a),
                    Err(e) => group_error(corr, &e),
                }
            }
            fb::Body::LeaveGroup => {
                let Some(l) = f.body_as_leave_group() else {
                    return invalid(corr, "not a leave");
                };
                let pof = self.partitions_of();
                let r = self.coordinator.borrow_mut().leave(
                    l.group(),
                    l.member_id(),
                    self.now_session_ms(),
                    &pof,
                );
                match r {
                    Ok(()) => g::encode_leave_group_response(corr),
                    Err(e) => group_error(corr, &e),
                }
            }
            fb::Body::CommitOffsets => self.commit_offsets(corr, &frame).await,
            fb::Body::FetchOffsets => {
                let Some(x) = f.body_as_fetch_offsets() else {
                    return invalid(corr, "not a fetch offsets");
                };
                let topics = g::decode_strings(x.topics());
                g::encode_fetch_offsets_response(
                    corr,
                    &self.coordinator.borrow().committed(x.group(), &topics),
                )
            }
            fb::Body::ListGroups => {
                g::encode_list_groups_response(corr, &self.coordinator.borrow().group_names())
            }
            fb::Body::DescribeGroup => {
                let Some(d) = f.body_as_describe_group() else {
                    return invalid(corr, "not a describe");
                };
                match self.coordinator.borrow().describe(d.group()) {
                    Some(out) => g::encode_describe_group_response(corr, &out),
                    None => group_error(corr, &GroupError::UnknownGroup(d.group().to_string())),
                }
            }
            other => invalid(
                corr,
                &format!("request type {} is not a group request", other.0),
            ),
        }
    }

    fn join_group(&self, corr: u64, frame: &VerifiedFrame) -> Bytes {
        let Some(j) = frame.view().body_as_join_group() else {
            return invalid(corr, "not a join");
        };
        if let Err(e) = crate::metadata::validate_topic_name(j.group()) {
            return invalid(corr, &format!("group name: {e}"));
        }
        let topics: Vec<String> = j.topics().iter().map(String::from).collect();
        if topics.is_empty() {
            return invalid(corr, "a member must subscribe to at least one topic");
        }
        if let Some(t) = topics.iter().find(|t| self.meta.borrow().get(t).is_none()) {
            return proto::encode_error(
                corr,
                fb::ErrorCode::UnknownTopic,
                &format!("unknown topic {t:?}"),
            );
        }
        let timeout = j.session_timeout_ms();
        if !(limits::SESSION_TIMEOUT_MS_MIN..=limits::SESSION_TIMEOUT_MS_MAX).contains(&timeout) {
            return invalid(
                corr,
                &format!(
                    "session timeout must be {}..={} ms",
                    limits::SESSION_TIMEOUT_MS_MIN,
                    limits::SESSION_TIMEOUT_MS_MAX
                ),
            );
        }
        if let Err(e) = self.coordinator.borrow().may_join(j.group()) {
            return group_error(corr, &e);
        }
        let now = self.now_session_ms();
        let pof = self.partitions_of();
        let a = self.coordinator.borrow_mut().join(
            j.group(),
            j.member_id().unwrap_or_default(),
            j.client_id().unwrap_or_default(),
            topics,
            u64::from(timeout),
            now,
            &pof,
        );
        g::encode_group_assignment(corr, &a)
    }

    async fn commit_offsets(&self, corr: u64, frame: &VerifiedFrame) -> Bytes {
        let Some(c) = frame.view().body_as_commit_offsets() else {
            return invalid(corr, "not a commit");
        };
        let group = c.group().to_string();
        let offsets = g::decode_offsets(Some(c.offsets()));
        if offsets.iter().any(|(_, _, o)| *o < 0) {
            return invalid(corr, "committed offsets must be ≥ 0");
        }
        let tps: Vec<Tp> = offsets.iter().map(|(t, p, _)| (t.clone(), *p)).collect();
        if let Err(e) = self
            .coordinator
            .borrow()
            .check_commit(&group, c.member_id(), &tps)
        {
            return group_error(corr, &e);
        }
        let Some(state) = self.state.borrow().clone() else {
            return proto::encode_error(corr, fb::ErrorCode::Internal, "state log not open");
        };
        let records: Vec<(String, g::OffsetOut)> =
            offsets.iter().map(|o| (group.clone(), o.clone())).collect();
        // Durable, then applied (in append order), then acknowledged.
        let ticket = self.state_order.begin().await;
        let durable = state.append(&records).await;
        self.state_order.wait_turn(ticket).await;
        if durable.is_ok() {
            self.coordinator.borrow_mut().apply_commit(&group, &offsets);
        }
        self.state_order.finish(ticket);
        if let Err(e) = durable {
            return proto::encode_error(
                corr,
                fb::ErrorCode::StorageFailed,
                &format!("state log: {e}"),
            );
        }
        self.maybe_compact_state().await;
        g::encode_commit_offsets_response(corr)
    }

    /// ListOffset on the partition's owner: -1 = start, -2 = end, else by timestamp.
    pub(super) async fn list_offset(
        &self,
        corr: u64,
        partition: u32,
        frame: VerifiedFrame,
    ) -> Bytes {
        let Some(l) = frame.view().body_as_list_offset() else {
            return invalid(corr, "not a list offset");
        };
        let (topic, ts) = (l.topic().to_string(), l.timestamp_ms());
        let part = match self.partition(corr, &topic, partition) {
            Ok(p) => p,
            Err(e) => return e,
        };
        match part.list_offset(ts).await {
            Ok(o) => g::encode_list_offset_response(corr, partition, o),
            Err(e) => crate::server::wire_error::frame(corr, &e),
        }
    }
}
