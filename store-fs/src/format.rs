//! The on-disk format: frames, what log and snapshot frames carry, and decoders that never
//! panic, whatever the bytes (a fuzz target feeds them arbitrary input).
//!
//! # Frames
//!
//! Logs and snapshots are both sequences of frames:
//!
//! ```text
//! magic "KLF1" (4 bytes) | payload length (u32 LE) | CRC-32C of the payload (u32 LE) | payload
//! ```
//!
//! The payload is compact JSON (`serde_json`). A length above [`MAX_FRAME_BYTES`] is rejected
//! before anything is allocated. Compact JSON never contains a byte below `0x20`, while the
//! most significant byte of every valid length is at most `0x10`, so the bytes of a frame can
//! never appear inside another frame's payload: when a scan finds a valid frame after a bad
//! one, that frame really was written after it.
//!
//! # Logs
//!
//! A log frame is a [`LogFrame`]: the `start` frame that opens every log of format 2 and names
//! its generation (so an emptied or swapped log is told from a new one), a batch the store
//! accepted, or the writer epoch a `restore` claimed. [`decode_log`] splits a log into valid
//! frames, corrupt spans and a torn tail. Only a frame cut short (a prefix of a frame: fewer
//! bytes than its length says) at the very end is a torn tail, what a write interrupted by a
//! crash leaves; a whole frame that fails its checksum is corrupt wherever it is, because it
//! may be an acknowledged write.
//!
//! # The `CURRENT` file
//!
//! One frame whose payload is a [`Current`]: the generation the store committed to. A
//! compaction writes it (atomically) only after the new generation's snapshot and log exist,
//! so a missing or emptied log of the committed generation is damage, while the files of a
//! newer, uncommitted generation are what an interrupted compaction leaves.
//!
//! # Snapshots
//!
//! A snapshot is one [`SnapshotFrame::Begin`], one frame per stored item (job, run, audit
//! record, slot claim, tombstone, incident, delivery), and one [`SnapshotFrame::End`] that
//! counts the items. One frame per item keeps every frame small, so a large history never
//! needs one huge allocation. A snapshot is all or nothing: any bad frame, a missing `End` or
//! a wrong count makes the whole snapshot unusable (the store then falls back to the previous
//! generation).

use std::fmt;
use std::io::{self, Read, Write};

use keel_core::outbox::Delivery;
use keel_core::{
    AuditRecord, Batch, BatchId, Incident, Job, JobId, Meta, Record, Run, RunId, Timestamp,
    Tombstone,
};
use serde::{Deserialize, Serialize};

/// The first four bytes of every frame.
pub const MAGIC: [u8; 4] = *b"KLF1";

/// Bytes before a frame's payload: magic, length, checksum.
pub const HEADER_BYTES: usize = 12;

/// The largest payload a frame may carry (256 MiB). A batch that encodes larger is refused.
pub const MAX_FRAME_BYTES: u32 = 256 * 1024 * 1024;

/// The exact contents of the `VERSION` file of a directory in this format.
pub const VERSION_MARKER: &str = "keel-store-fs 2\n";

/// The `VERSION` of format 1 (no `CURRENT` file, logs without a `start` frame), still read:
/// the first writer of this build migrates it (see the crate docs).
pub const VERSION_MARKER_V1: &str = "keel-store-fs 1\n";

/// What the `CURRENT` file names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Current {
    /// The committed generation: its log exists and starts with its `start` frame.
    pub generation: u64,
}

/// What a log frame records.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFrame {
    /// The first frame of a log (format 2): the generation the log belongs to.
    Start {
        /// The log's generation.
        generation: u64,
    },
    /// A batch the write rules accepted, applied in order.
    Batch {
        /// The batch's id (for diagnostics; the store does not interpret it).
        id: BatchId,
        /// The writer's clock when it built the batch.
        at: Timestamp,
        /// The records.
        records: Vec<Record>,
    },
    /// `restore` made `epoch` the store's writer epoch.
    Writer {
        /// The new writer epoch.
        epoch: u64,
    },
}

/// The same shape as [`LogFrame`], borrowed, so a batch is encoded without copying it.
#[derive(Serialize)]
#[serde(rename_all = "snake_case")]
enum LogFrameRef<'a> {
    Start {
        generation: u64,
    },
    Batch {
        id: BatchId,
        at: Timestamp,
        records: &'a [Record],
    },
    Writer {
        epoch: u64,
    },
}

/// What a snapshot frame holds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
// Frames are decoded one at a time and moved straight into the store's maps.
#[allow(clippy::large_enum_variant)]
pub enum SnapshotFrame {
    /// The first frame.
    Begin(SnapshotHeader),
    /// A job.
    Job(Job),
    /// A run, terminal or not.
    Run(Run),
    /// An audit record.
    Audit(AuditRecord),
    /// The slot claim of a stored run (builds before 2026-12 also kept pruned runs' claims).
    Slot(SlotClaim),
    /// A tombstone.
    Tombstone(Tombstone),
    /// An incident, open or resolved.
    Incident(Incident),
    /// A delivery in the outbox.
    Delivery(Delivery),
    /// The last frame.
    End {
        /// How many item frames came between `Begin` and `End`.
        items: u64,
    },
}

/// The same shape as [`SnapshotFrame`], borrowed, for writing a snapshot from the store's maps.
#[derive(Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum SnapshotFrameRef<'a> {
    Begin(&'a SnapshotHeader),
    Job(&'a Job),
    Run(&'a Run),
    Audit(&'a AuditRecord),
    Slot(&'a SlotClaim),
    Tombstone(&'a Tombstone),
    Incident(&'a Incident),
    Delivery(&'a Delivery),
    End { items: u64 },
}

/// What a snapshot says about itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotHeader {
    /// The generation it starts (it holds the state after every log before it).
    pub generation: u64,
    /// The writer epoch.
    pub writer_epoch: u64,
    /// The counters.
    pub meta: Meta,
    /// How long the previous generation's log was when this snapshot was taken from it, so
    /// that the fallback generation can be verified whole (absent in format 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_log_len: Option<u64>,
}

/// A `(job, slot)` and the run that claimed it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotClaim {
    /// The job.
    pub job: JobId,
    /// The slot.
    pub slot: Timestamp,
    /// The run that claimed it.
    pub run: RunId,
}

/// Why bytes are not a valid frame.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Fewer bytes than the header or the payload needs.
    #[error("truncated frame: {needed} bytes needed, {available} available")]
    Truncated {
        /// Bytes the frame needs.
        needed: u64,
        /// Bytes there are.
        available: u64,
    },
    /// The first four bytes are not [`MAGIC`].
    #[error("bad magic {found:02x?}")]
    BadMagic {
        /// The bytes found.
        found: [u8; 4],
    },
    /// The length is above [`MAX_FRAME_BYTES`].
    #[error("frame length {len} exceeds the limit of {MAX_FRAME_BYTES} bytes")]
    TooLong {
        /// The length found.
        len: u32,
    },
    /// The payload's checksum does not match.
    #[error("checksum mismatch: stored {stored:08x}, computed {computed:08x}")]
    BadChecksum {
        /// The checksum in the header.
        stored: u32,
        /// The checksum of the bytes found.
        computed: u32,
    },
    /// The checksum matches but the payload is not what this frame should hold.
    #[error("undecodable payload: {0}")]
    BadPayload(String),
}

/// A valid frame found by [`decode_log`].
#[derive(Clone, Debug, PartialEq)]
pub struct LogEntry {
    /// Where the frame starts, relative to the decoded bytes.
    pub offset: u64,
    /// The frame's length, header included.
    pub len: u64,
    /// What it records.
    pub frame: LogFrame,
}

/// Bytes that are not valid frames.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BadSpan {
    /// Where they start, relative to the decoded bytes.
    pub offset: u64,
    /// How many bytes.
    pub len: u64,
    /// Why the first frame there is not valid.
    pub reason: String,
}

/// A log split into what can be read and what cannot. Every byte belongs to exactly one
/// entry, corrupt span or the torn tail, in order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LogScan {
    /// Valid frames, in order.
    pub entries: Vec<LogEntry>,
    /// Bad spans that a valid frame follows: corruption, to quarantine and skip.
    pub corrupt: Vec<BadSpan>,
    /// A frame cut short at the end, with no valid frame after it: an interrupted write.
    pub torn_tail: Option<BadSpan>,
    /// Where the readable part of the log ends (the torn tail's offset, or the length): the
    /// log continues here.
    pub valid_len: u64,
}

/// The body of the `store_decode` fuzz target (and of its corpus replay on stable): decodes
/// arbitrary bytes as a log and as a snapshot, and panics only if the log scan breaks its
/// contract, accounting for every byte exactly once, in order, with `valid_len` where the
/// torn tail begins.
#[doc(hidden)]
pub fn fuzz_decode(bytes: &[u8]) {
    let scan = decode_log(bytes);
    let mut spans: Vec<(u64, u64)> = scan
        .entries
        .iter()
        .map(|e| (e.offset, e.len))
        .chain(scan.corrupt.iter().map(|c| (c.offset, c.len)))
        .chain(scan.torn_tail.iter().map(|t| (t.offset, t.len)))
        .collect();
    spans.sort_unstable();
    let mut at = 0;
    for (offset, len) in spans {
        assert_eq!(offset, at, "gap or overlap at {offset}");
        assert!(len > 0, "empty span at {offset}");
        at += len;
    }
    assert_eq!(at, bytes.len() as u64, "the spans do not cover the input");
    let tail = scan
        .torn_tail
        .as_ref()
        .map_or(bytes.len() as u64, |t| t.offset);
    assert_eq!(
        scan.valid_len, tail,
        "valid_len is not where the torn tail starts"
    );
    let _ = decode_snapshot(bytes);
}

/// Splits `bytes` (a whole log, or its part from a frame boundary on) into frames, corrupt
/// spans and a torn tail. Never panics.
pub fn decode_log(bytes: &[u8]) -> LogScan {
    let mut scan = LogScan::default();
    let mut pos = 0;
    while pos < bytes.len() {
        let reason = match frame_at(bytes, pos) {
            Ok((payload, end)) => {
                match serde_json::from_slice::<LogFrame>(payload) {
                    Ok(frame) => scan.entries.push(LogEntry {
                        offset: pos as u64,
                        len: (end - pos) as u64,
                        frame,
                    }),
                    // Complete and checksummed, so not torn: quarantine it even at the end.
                    Err(e) => scan.corrupt.push(BadSpan {
                        offset: pos as u64,
                        len: (end - pos) as u64,
                        reason: FrameError::BadPayload(e.to_string()).to_string(),
                    }),
                }
                pos = end;
                continue;
            }
            Err(e) => e.to_string(),
        };
        let next = next_frame(bytes, pos + 1);
        let span = BadSpan {
            offset: pos as u64,
            len: (next.unwrap_or(bytes.len()) - pos) as u64,
            reason,
        };
        match next {
            Some(next) => {
                scan.corrupt.push(span);
                pos = next;
            }
            None if cut_short(bytes.get(pos..).unwrap_or_default()) => {
                scan.torn_tail = Some(span);
                break;
            }
            None => {
                scan.corrupt.push(span);
                break;
            }
        }
    }
    scan.valid_len = scan
        .torn_tail
        .as_ref()
        .map_or(bytes.len() as u64, |t| t.offset);
    scan
}

/// Decodes a whole snapshot held in memory, checking its structure like the store does when
/// it loads one. Never panics.
pub fn decode_snapshot(bytes: &[u8]) -> Result<Vec<SnapshotFrame>, SnapshotError> {
    let mut reader = SnapshotReader::new(bytes, bytes.len() as u64);
    let mut frames = vec![SnapshotFrame::Begin(reader.header()?.clone())];
    while let Some(frame) = reader.next_item()? {
        frames.push(frame);
    }
    frames.push(SnapshotFrame::End {
        items: reader.items,
    });
    Ok(frames)
}

/// Why a snapshot cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// A frame is bad.
    #[error("at byte {offset}: {error}")]
    Frame {
        /// Where the frame starts.
        offset: u64,
        /// What is wrong.
        error: FrameError,
    },
    /// The frames are valid but do not form a snapshot.
    #[error("at byte {offset}: {detail}")]
    Structure {
        /// Where.
        offset: u64,
        /// What is wrong.
        detail: String,
    },
    /// Reading failed.
    #[error("read failed: {0}")]
    Io(#[from] io::Error),
}

/// Reads a snapshot frame by frame, checking its structure: `Begin` first, `End` last with the
/// right count, nothing after it.
pub(crate) struct SnapshotReader<R> {
    frames: FrameReader<R>,
    header: Option<SnapshotHeader>,
    items: u64,
    ended: bool,
}

impl<R: Read> SnapshotReader<R> {
    /// Reads from `reader`, which holds `len` bytes.
    pub(crate) fn new(reader: R, len: u64) -> Self {
        SnapshotReader {
            frames: FrameReader {
                reader,
                offset: 0,
                len,
            },
            header: None,
            items: 0,
            ended: false,
        }
    }

    /// The `Begin` frame.
    pub(crate) fn header(&mut self) -> Result<&SnapshotHeader, SnapshotError> {
        if self.header.is_none() {
            let offset = self.frames.offset;
            match self.frames.next_decoded()? {
                Some(SnapshotFrame::Begin(header)) => self.header = Some(header),
                _ => return Err(structure(offset, "the first frame is not `begin`")),
            }
        }
        // Set just above or on an earlier call.
        self.header
            .as_ref()
            .ok_or_else(|| structure(0, "no header"))
    }

    /// The next item, or `None` after a valid `End` frame that closes the file.
    pub(crate) fn next_item(&mut self) -> Result<Option<SnapshotFrame>, SnapshotError> {
        self.header()?;
        if self.ended {
            return Ok(None);
        }
        let offset = self.frames.offset;
        match self.frames.next_decoded()? {
            None => Err(structure(
                offset,
                "the snapshot ends without an `end` frame",
            )),
            Some(SnapshotFrame::Begin(_)) => Err(structure(offset, "a second `begin` frame")),
            Some(SnapshotFrame::End { items }) => {
                if items != self.items {
                    return Err(structure(
                        offset,
                        &format!("`end` counts {items} items, {} were read", self.items),
                    ));
                }
                if self.frames.offset != self.frames.len {
                    return Err(structure(self.frames.offset, "bytes after the `end` frame"));
                }
                self.ended = true;
                Ok(None)
            }
            Some(item) => {
                self.items += 1;
                Ok(Some(item))
            }
        }
    }
}

fn structure(offset: u64, detail: &str) -> SnapshotError {
    SnapshotError::Structure {
        offset,
        detail: detail.to_string(),
    }
}

/// Reads frames one by one from a reader of known length, strictly: any bad frame is an error.
struct FrameReader<R> {
    reader: R,
    offset: u64,
    len: u64,
}

impl<R: Read> FrameReader<R> {
    fn next_decoded(&mut self) -> Result<Option<SnapshotFrame>, SnapshotError> {
        let offset = self.offset;
        let Some(payload) = self.next_payload()? else {
            return Ok(None);
        };
        serde_json::from_slice(&payload)
            .map(Some)
            .map_err(|e| SnapshotError::Frame {
                offset,
                error: FrameError::BadPayload(e.to_string()),
            })
    }

    fn next_payload(&mut self) -> Result<Option<Vec<u8>>, SnapshotError> {
        let offset = self.offset;
        let available = self.len.saturating_sub(offset);
        if available == 0 {
            return Ok(None);
        }
        let frame_error = |error| SnapshotError::Frame { offset, error };
        if available < HEADER_BYTES as u64 {
            return Err(frame_error(FrameError::Truncated {
                needed: HEADER_BYTES as u64,
                available,
            }));
        }
        let mut header = [0u8; HEADER_BYTES];
        self.reader.read_exact(&mut header)?;
        let (len, stored) = parse_header(&header).map_err(frame_error)?;
        let needed = HEADER_BYTES as u64 + u64::from(len);
        if needed > available {
            return Err(frame_error(FrameError::Truncated { needed, available }));
        }
        // Bounded by MAX_FRAME_BYTES and by what the file holds.
        let mut payload = vec![0u8; len as usize];
        self.reader.read_exact(&mut payload)?;
        let computed = crc32c(&payload);
        if computed != stored {
            return Err(frame_error(FrameError::BadChecksum { stored, computed }));
        }
        self.offset += needed;
        Ok(Some(payload))
    }
}

/// Why a batch cannot be written as a log frame. Nothing was written.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum EncodeError {
    /// A record holds a float JSON cannot carry (NaN or an infinity would be written as
    /// `null`, which then does not read back as a number).
    #[error("{record} has {field} = {value}, which is not a finite number")]
    NonFiniteFloat {
        /// The record, as `PutJob job-7` or `PutRun run-12`.
        record: String,
        /// The field, as `retry.backoff_factor`.
        field: &'static str,
        /// The value found.
        value: f64,
    },
    /// The encoder refused a value.
    #[error("cannot encode: {0}")]
    Serde(String),
    /// The payload is over [`MAX_FRAME_BYTES`].
    #[error("it encodes to {bytes} bytes, over the frame limit of {MAX_FRAME_BYTES}")]
    TooLarge {
        /// The payload's length.
        bytes: usize,
    },
    /// Debug builds only: the frame did not decode back to the batch it was encoded from.
    #[error("its encoding does not read back as the same batch: {0}")]
    NotRoundTrip(String),
}

/// Encodes `batch` as one log frame.
///
/// An acknowledged batch must be readable at recovery. This used to be checked by decoding
/// every frame back on the write path (about a quarter of a durable firing's CPU); it is now
/// guaranteed by construction and proven by tests instead:
///
/// - serde's derived encoding of a [`Record`] is deterministic and every value it writes reads
///   back equal (in its stored form, [`Record::into_stored`]: the fields that are not
///   persisted read back at their defaults), except non-finite floats, the one value JSON
///   cannot carry, which [`non_finite_float`] refuses here (with the record and field named);
/// - the model store (`keel-testkit`) asserts that every record of every batch round-trips
///   equal, so every property test and fuzz-corpus replay of the core proves it for the
///   records the scheduler really writes, and `tests::every_record_kind_round_trips` proves it
///   for each kind;
/// - in debug builds (every test and the crash and soak suites) this function still decodes
///   the frame back and compares it with `batch`, and refuses the batch if they differ.
///
/// The store applies the caller's batch in memory, which therefore equals what a replay of the
/// log builds. The payload is encoded straight after a reserved header (one buffer, sized from
/// the record count, no copy) and the header is filled in last.
pub(crate) fn encode_batch(batch: &Batch) -> Result<Vec<u8>, EncodeError> {
    if let Some(error) = batch.records.iter().find_map(non_finite_float) {
        return Err(error);
    }
    let frame = encode_frame(
        &LogFrameRef::Batch {
            id: batch.id,
            at: batch.at,
            records: &batch.records,
        },
        BATCH_BYTES_PER_RECORD.saturating_mul(batch.records.len()),
    )?;
    #[cfg(debug_assertions)]
    check_round_trip(&frame, batch)?;
    Ok(frame)
}

/// A guess at a record's encoded size, so that a batch's buffer is allocated once: a firing's
/// batch averages about 500 bytes per record (its job, two runs, audit records, counters).
const BATCH_BYTES_PER_RECORD: usize = 640;

/// The first float in `record` that JSON cannot carry: the retry policy's `backoff_factor` and
/// `jitter` (in a job's spec and copied into each run) are the only floats a record holds.
/// `RetryPolicy::validate` already refuses them when a job is added; this guards the store
/// against a batch built some other way.
fn non_finite_float(record: &Record) -> Option<EncodeError> {
    let retry = match record {
        Record::PutJob(job) => &job.spec.retry,
        Record::PutRun(run) => run.retry(),
        _ => return None,
    };
    // The record is named only for the error: every record of every batch passes here.
    let name = || match record {
        Record::PutJob(job) => format!("PutJob {}", job.spec.id),
        Record::PutRun(run) => format!("PutRun {}", run.id()),
        _ => String::new(),
    };
    [
        ("retry.backoff_factor", retry.backoff_factor),
        ("retry.jitter", retry.jitter),
    ]
    .into_iter()
    .find(|(_, value)| !value.is_finite())
    .map(|(field, value)| EncodeError::NonFiniteFloat {
        record: name(),
        field,
        value,
    })
}

/// Decodes `frame` and compares it with `batch` (debug builds: see [`encode_batch`]).
#[cfg(debug_assertions)]
fn check_round_trip(frame: &[u8], batch: &Batch) -> Result<(), EncodeError> {
    let not = |why: String| EncodeError::NotRoundTrip(why);
    let (payload, _) = frame_at(frame, 0).map_err(|e| not(e.to_string()))?;
    match serde_json::from_slice::<LogFrame>(payload) {
        Ok(LogFrame::Batch { id, at, records }) if id == batch.id && at == batch.at => {
            let stored = batch.records.iter().cloned().map(Record::into_stored);
            match records
                .iter()
                .zip(stored)
                .position(|(read, sent)| *read != sent)
            {
                None if records.len() == batch.records.len() => Ok(()),
                None => Err(not("it holds another number of records".to_string())),
                Some(at) => Err(not(format!("record {at} reads back different"))),
            }
        }
        Ok(_) => Err(not("it decodes to something else".to_string())),
        Err(e) => Err(not(e.to_string())),
    }
}

/// Encodes `value` as one frame: the JSON payload is written after a reserved header, which is
/// filled in once the payload's length and checksum are known. `capacity` is a guess at the
/// payload's size.
fn encode_frame(value: &impl Serialize, capacity: usize) -> Result<Vec<u8>, EncodeError> {
    let mut frame = Vec::with_capacity(HEADER_BYTES + capacity);
    frame.extend_from_slice(&[0; HEADER_BYTES]);
    serde_json::to_writer(&mut frame, value).map_err(|e| EncodeError::Serde(e.to_string()))?;
    let payload = frame.get(HEADER_BYTES..).unwrap_or_default();
    let len = u32::try_from(payload.len())
        .ok()
        .filter(|len| *len <= MAX_FRAME_BYTES)
        .ok_or(EncodeError::TooLarge {
            bytes: payload.len(),
        })?;
    let mut header = [0u8; HEADER_BYTES];
    header[..4].copy_from_slice(&MAGIC);
    header[4..8].copy_from_slice(&len.to_le_bytes());
    header[8..].copy_from_slice(&crc32c(payload).to_le_bytes());
    frame[..HEADER_BYTES].copy_from_slice(&header);
    Ok(frame)
}

/// Encodes the `start` frame of generation `generation`'s log.
pub(crate) fn encode_start(generation: u64) -> Result<Vec<u8>, EncodeError> {
    encode_frame(&LogFrameRef::Start { generation }, 32)
}

/// Encodes the contents of the `CURRENT` file.
pub(crate) fn encode_current(current: Current) -> Result<Vec<u8>, EncodeError> {
    encode_frame(&current, 32)
}

/// Decodes the contents of the `CURRENT` file: exactly one valid frame.
pub fn decode_current(bytes: &[u8]) -> Result<Current, FrameError> {
    let (payload, end) = frame_at(bytes, 0)?;
    if end != bytes.len() {
        return Err(FrameError::BadPayload(format!(
            "{} bytes after the frame",
            bytes.len() - end
        )));
    }
    serde_json::from_slice(payload).map_err(|e| FrameError::BadPayload(e.to_string()))
}

/// Encodes a writer epoch claim as one log frame.
pub(crate) fn encode_writer(epoch: u64) -> Result<Vec<u8>, EncodeError> {
    encode_frame(&LogFrameRef::Writer { epoch }, 32)
}

/// Writes one snapshot frame.
pub(crate) fn write_snapshot_frame(
    out: &mut impl Write,
    frame: &SnapshotFrameRef<'_>,
) -> io::Result<()> {
    out.write_all(&encode_frame(frame, 512).map_err(io::Error::other)?)
}

/// Frames `payload`: header, then the payload.
pub fn frame_bytes(payload: &[u8]) -> Result<Vec<u8>, String> {
    let len = u32::try_from(payload.len())
        .ok()
        .filter(|len| *len <= MAX_FRAME_BYTES)
        .ok_or_else(|| {
            format!(
                "it encodes to {} bytes, over the frame limit of {MAX_FRAME_BYTES}",
                payload.len()
            )
        })?;
    let mut frame = Vec::with_capacity(HEADER_BYTES + payload.len());
    frame.extend_from_slice(&MAGIC);
    frame.extend_from_slice(&len.to_le_bytes());
    frame.extend_from_slice(&crc32c(payload).to_le_bytes());
    frame.extend_from_slice(payload);
    Ok(frame)
}

/// The frame starting at `pos`: its payload and where it ends.
fn frame_at(bytes: &[u8], pos: usize) -> Result<(&[u8], usize), FrameError> {
    let rest = bytes.get(pos..).unwrap_or_default();
    let header = rest
        .get(..HEADER_BYTES)
        .and_then(|h| <&[u8; HEADER_BYTES]>::try_from(h).ok())
        .ok_or(FrameError::Truncated {
            needed: HEADER_BYTES as u64,
            available: rest.len() as u64,
        })?;
    let (len, stored) = parse_header(header)?;
    let end = HEADER_BYTES + len as usize;
    let payload = rest.get(HEADER_BYTES..end).ok_or(FrameError::Truncated {
        needed: end as u64,
        available: rest.len() as u64,
    })?;
    let computed = crc32c(payload);
    if computed != stored {
        return Err(FrameError::BadChecksum { stored, computed });
    }
    Ok((payload, pos + end))
}

/// Checks a header's magic and length; returns the length and the stored checksum.
fn parse_header(header: &[u8; HEADER_BYTES]) -> Result<(u32, u32), FrameError> {
    let [m0, m1, m2, m3, l0, l1, l2, l3, c0, c1, c2, c3] = *header;
    let found = [m0, m1, m2, m3];
    if found != MAGIC {
        return Err(FrameError::BadMagic { found });
    }
    let len = u32::from_le_bytes([l0, l1, l2, l3]);
    if len > MAX_FRAME_BYTES {
        return Err(FrameError::TooLong { len });
    }
    Ok((len, u32::from_le_bytes([c0, c1, c2, c3])))
}

/// True if `rest`, bad bytes at the end of a log with no valid frame after them, can be what
/// a write cut short leaves: a prefix of a frame (the magic as far as it goes, and a length
/// that runs past the end), or zeros (a filesystem that grew the file before the data reached
/// it). A whole frame is never torn, even if its length field was damaged: the checksum of
/// everything after the header then still matches.
fn cut_short(rest: &[u8]) -> bool {
    if rest.iter().all(|&b| b == 0) {
        return true;
    }
    let magic = rest.len().min(MAGIC.len());
    if rest.get(..magic) != MAGIC.get(..magic) {
        return false;
    }
    let Some(header) = rest
        .get(..HEADER_BYTES)
        .and_then(|h| <&[u8; HEADER_BYTES]>::try_from(h).ok())
    else {
        return true;
    };
    let Ok((len, stored)) = parse_header(header) else {
        return false;
    };
    let payload = rest.get(HEADER_BYTES..).unwrap_or_default();
    payload.len() < len as usize && crc32c(payload) != stored
}

/// The start of the first valid frame (magic, length and checksum) at or after `from`.
fn next_frame(bytes: &[u8], from: usize) -> Option<usize> {
    let mut at = from;
    loop {
        let rest = bytes.get(at..)?;
        let found = rest.windows(MAGIC.len()).position(|w| w == MAGIC)?;
        let candidate = at + found;
        if frame_at(bytes, candidate).is_ok() {
            return Some(candidate);
        }
        at = candidate + 1;
    }
}

/// CRC-32C (Castagnoli, reflected polynomial `0x82F63B78`), as used by iSCSI, ext4 and
/// LevelDB. The `crc32c` crate computes it with the CPU's instruction where there is one.
pub fn crc32c(bytes: &[u8]) -> u32 {
    crc32c::crc32c(bytes)
}

impl fmt::Display for BadSpan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} bytes at offset {}: {}",
            self.len, self.offset, self.reason
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn writer_frame(epoch: u64) -> Vec<u8> {
        encode_writer(epoch).unwrap()
    }

    /// A frame with a valid checksum whose payload is not a log frame.
    fn foreign_frame() -> Vec<u8> {
        frame_bytes(br#"{"unknown":1}"#).unwrap()
    }

    #[test]
    fn crc32c_matches_known_vectors() {
        assert_eq!(crc32c(b""), 0);
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(crc32c(&[0xffu8; 32]), 0x62A8_AB43);
        let ascending: Vec<u8> = (0..32).collect();
        assert_eq!(crc32c(&ascending), 0x46DD_794E);
    }

    #[test]
    fn crc32c_equals_the_bitwise_definition_at_every_length() {
        let bytes: Vec<u8> = (0..1000u32).map(|i| (i * 7 + i / 3) as u8).collect();
        for len in 0..bytes.len() {
            let mut crc = !0u32;
            for &b in &bytes[..len] {
                crc ^= u32::from(b);
                for _ in 0..8 {
                    crc = if crc & 1 == 1 {
                        (crc >> 1) ^ 0x82F6_3B78
                    } else {
                        crc >> 1
                    };
                }
            }
            assert_eq!(crc32c(&bytes[..len]), !crc, "length {len}");
        }
    }

    #[test]
    fn frames_round_trip() {
        let mut log = Vec::new();
        for epoch in 1..=3 {
            log.extend(writer_frame(epoch));
        }
        let scan = decode_log(&log);
        let epochs: Vec<LogFrame> = scan.entries.iter().map(|e| e.frame.clone()).collect();
        assert_eq!(
            epochs,
            (1..=3)
                .map(|epoch| LogFrame::Writer { epoch })
                .collect::<Vec<_>>()
        );
        assert!(scan.corrupt.is_empty() && scan.torn_tail.is_none());
        assert_eq!(scan.valid_len, log.len() as u64);
    }

    #[test]
    fn a_cut_last_frame_is_a_torn_tail() {
        let first = writer_frame(1);
        let second = writer_frame(2);
        for cut in 1..second.len() {
            let mut log = first.clone();
            log.extend_from_slice(&second[..cut]);
            let scan = decode_log(&log);
            assert_eq!(scan.entries.len(), 1);
            let torn = scan.torn_tail.expect("torn tail");
            assert_eq!(torn.offset, first.len() as u64);
            assert_eq!(torn.len, cut as u64);
            assert_eq!(scan.valid_len, first.len() as u64);
        }
    }

    #[test]
    fn a_damaged_frame_between_valid_ones_is_corrupt() {
        let frames: Vec<Vec<u8>> = (1..=3).map(writer_frame).collect();
        let middle = frames[0].len();
        for flip in 0..frames[1].len() {
            let mut log = frames.concat();
            log[middle + flip] ^= 0x40;
            let scan = decode_log(&log);
            assert_eq!(scan.torn_tail, None, "flip at {flip}");
            assert_eq!(scan.corrupt.len(), 1, "flip at {flip}");
            assert_eq!(scan.corrupt[0].offset, middle as u64);
            assert_eq!(scan.corrupt[0].len, frames[1].len() as u64);
            let kept: Vec<&LogFrame> = scan.entries.iter().map(|e| &e.frame).collect();
            assert_eq!(
                kept,
                [
                    &LogFrame::Writer { epoch: 1 },
                    &LogFrame::Writer { epoch: 3 }
                ]
            );
        }
    }

    #[test]
    fn a_checksummed_frame_that_does_not_decode_is_corrupt_even_at_the_end() {
        let mut log = writer_frame(1);
        log.extend(foreign_frame());
        let scan = decode_log(&log);
        assert_eq!(scan.torn_tail, None);
        assert_eq!(scan.corrupt.len(), 1);
        assert!(scan.corrupt[0].reason.contains("undecodable"));
        assert_eq!(scan.valid_len, log.len() as u64);
    }

    #[test]
    fn a_whole_last_frame_that_fails_its_checksum_is_corrupt_not_torn() {
        let first = writer_frame(1);
        let second = writer_frame(2);
        for flip in 0..second.len() {
            let mut log = [first.clone(), second.clone()].concat();
            log[first.len() + flip] ^= 0x08;
            let scan = decode_log(&log);
            assert_eq!(scan.torn_tail, None, "flip at {flip}");
            assert_eq!(scan.corrupt.len(), 1, "flip at {flip}");
            assert_eq!(scan.corrupt[0].offset, first.len() as u64);
            assert_eq!(scan.valid_len, log.len() as u64);
        }
        // Zeros where a frame should be: the file grew before its data reached the disk.
        let mut zeros = first.clone();
        zeros.extend_from_slice(&[0; 40]);
        assert!(decode_log(&zeros).torn_tail.is_some());
    }

    #[test]
    fn current_round_trips_and_rejects_damage() {
        let bytes = encode_current(Current { generation: 7 }).unwrap();
        assert_eq!(decode_current(&bytes), Ok(Current { generation: 7 }));
        let mut bad = bytes.clone();
        let last = bad.len() - 2;
        bad[last] ^= 1;
        assert!(decode_current(&bad).is_err());
        assert!(decode_current(&bytes[..bytes.len() - 1]).is_err());
        assert!(decode_current(&[]).is_err());
    }

    #[test]
    fn magic_inside_a_payload_is_not_a_frame() {
        // A record's text may contain the magic; the JSON around it never forms a header.
        let payload =
            serde_json::to_vec(&serde_json::json!({ "note": "KLF1KLF1\u{1}\u{0}" })).unwrap();
        let mut log = frame_bytes(&payload).unwrap();
        log.truncate(log.len() - 1);
        let scan = decode_log(&log);
        assert_eq!(scan.torn_tail.map(|t| t.offset), Some(0));
        assert!(scan.corrupt.is_empty());
    }

    #[test]
    fn an_absurd_length_allocates_nothing() {
        let mut log = MAGIC.to_vec();
        log.extend_from_slice(&u32::MAX.to_le_bytes());
        log.extend_from_slice(&[0; 4]);
        let scan = decode_log(&log);
        // Nothing the store writes has such a length: damage, not a write cut short.
        assert_eq!(scan.torn_tail, None);
        assert!(
            scan.corrupt[0].reason.contains("exceeds"),
            "{:?}",
            scan.corrupt
        );
        assert!(matches!(
            decode_snapshot(&log),
            Err(SnapshotError::Frame {
                error: FrameError::TooLong { .. },
                ..
            })
        ));
    }

    /// Arbitrary bytes, and valid logs damaged at random: the scan never panics and accounts
    /// for every byte exactly once, in order.
    #[test]
    fn decoding_arbitrary_bytes_partitions_them() {
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..2_000 {
            let mut bytes = Vec::new();
            let frames = next() % 6;
            for i in 0..frames {
                match next() % 4 {
                    0 => bytes.extend(foreign_frame()),
                    1 => bytes.extend((0..next() % 40).map(|_| next() as u8)),
                    _ => bytes.extend(writer_frame(i)),
                }
            }
            for _ in 0..next() % 4 {
                if bytes.is_empty() {
                    break;
                }
                let at = (next() as usize) % bytes.len();
                match next() % 3 {
                    0 => bytes[at] ^= 1 << (next() % 8),
                    1 => bytes.truncate(at),
                    _ => bytes.insert(at, next() as u8),
                }
            }
            fuzz_decode(&bytes);
        }
    }

    fn job(name: &str, retry: keel_core::RetryPolicy) -> Job {
        let spec = keel_core::JobSpec::new(
            JobId::new(name).unwrap(),
            "work",
            keel_core::ScheduleSpec::cron("0 * * * * *"),
        )
        .with_retry(retry);
        Job {
            spec,
            state: keel_core::JobState::Scheduled {
                next: Timestamp(60_000),
            },
            backlog: Default::default(),
            last_fired: Some(Timestamp(0)),
            // Not persisted: reads back as 0.
            active_runs: 3,
            delete_when_idle: false,
            last_run: None,
            failures_in_a_row: 2,
        }
    }

    fn run(id: u64, job: &str, retry: keel_core::RetryPolicy) -> Run {
        let mut terms = keel_core::RunTerms::new("work");
        terms.retry = retry;
        Run::new(
            RunId(id),
            JobId::new(job).unwrap(),
            keel_core::Trigger::Scheduled {
                slot: Timestamp(60_000),
            },
            Timestamp(60_000),
            terms,
        )
    }

    /// Floats that JSON writes with more digits than they look: they read back bit for bit.
    fn odd_retry() -> keel_core::RetryPolicy {
        keel_core::RetryPolicy {
            backoff_factor: 1.0 + f64::EPSILON * 3.0,
            jitter: 0.1 + 0.2,
            ..Default::default()
        }
    }

    /// What the store now relies on instead of decoding each frame back (`encode_batch`): a
    /// batch of every record kind a store-fs test can build reads back from the log as the
    /// batch in its stored form, in release builds too.
    #[test]
    fn every_record_kind_round_trips_through_a_log_frame() {
        let batch = Batch {
            id: BatchId(7 << 32),
            at: Timestamp(61_000),
            records: vec![
                Record::PutJob(job("a", odd_retry()).into()),
                Record::PutRun(run(1, "a", odd_retry())),
                Record::PruneHistory {
                    job: Some(JobId::new("a").unwrap()),
                    keep_last: 3,
                    finished_before: Timestamp(5),
                },
                Record::PruneHistory {
                    job: None,
                    keep_last: 0,
                    finished_before: Timestamp(0),
                },
                Record::PutMeta(Meta {
                    next_run_id: 2,
                    epoch: 7,
                    ..Meta::default()
                }),
                Record::PutTombstone(keel_core::Tombstone {
                    job: JobId::new("b").unwrap(),
                    last_fired: Timestamp(1),
                    deleted_at: Timestamp(2),
                }),
                Record::DeleteTombstone {
                    job: JobId::new("b").unwrap(),
                },
                Record::DeleteJob {
                    id: JobId::new("c").unwrap(),
                },
                Record::DeleteDelivery {
                    id: keel_core::outbox::DeliveryId(4),
                },
            ],
        };
        let frame = encode_batch(&batch).unwrap();
        let scan = decode_log(&frame);
        assert!(scan.corrupt.is_empty() && scan.torn_tail.is_none());
        let stored: Vec<Record> = batch
            .records
            .iter()
            .cloned()
            .map(Record::into_stored)
            .collect();
        assert_eq!(
            scan.entries
                .into_iter()
                .map(|e| e.frame)
                .collect::<Vec<_>>(),
            vec![LogFrame::Batch {
                id: batch.id,
                at: batch.at,
                records: stored,
            }]
        );
        // Encoding is deterministic: the same batch gives the same bytes.
        assert_eq!(encode_batch(&batch).unwrap(), frame);
        // The header is the one `frame_bytes` builds around the same payload.
        assert_eq!(frame_bytes(&frame[HEADER_BYTES..]).unwrap(), frame);
    }

    /// JSON writes NaN and the infinities as `null`, which does not read back as a number: a
    /// batch holding one is refused with the record and field named, not acknowledged.
    #[test]
    fn a_non_finite_float_is_refused_not_written() {
        for value in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            let bad = keel_core::RetryPolicy {
                jitter: value,
                ..Default::default()
            };
            let batch = Batch {
                id: BatchId(1),
                at: Timestamp(0),
                records: vec![Record::PutRun(run(9, "j", bad))],
            };
            match encode_batch(&batch) {
                Err(EncodeError::NonFiniteFloat { record, field, .. }) => {
                    assert_eq!((record.as_str(), field), ("PutRun run-9", "retry.jitter"));
                }
                other => panic!("{other:?}"),
            }
            let bad = keel_core::RetryPolicy {
                backoff_factor: value,
                ..Default::default()
            };
            let batch = Batch {
                id: BatchId(1),
                at: Timestamp(0),
                records: vec![Record::PutJob(job("j", bad).into())],
            };
            let error = encode_batch(&batch).unwrap_err();
            assert!(
                error
                    .to_string()
                    .contains("PutJob j has retry.backoff_factor"),
                "{error}"
            );
        }
    }

    #[test]
    fn snapshots_must_be_complete() {
        let header = SnapshotHeader {
            generation: 3,
            writer_epoch: 2,
            meta: Meta::default(),
            previous_log_len: Some(12),
        };
        let claim = SlotClaim {
            job: JobId::new("a").unwrap(),
            slot: Timestamp(5),
            run: RunId(9),
        };
        let mut bytes = Vec::new();
        write_snapshot_frame(&mut bytes, &SnapshotFrameRef::Begin(&header)).unwrap();
        write_snapshot_frame(&mut bytes, &SnapshotFrameRef::Slot(&claim)).unwrap();
        let without_end = bytes.len();
        write_snapshot_frame(&mut bytes, &SnapshotFrameRef::End { items: 1 }).unwrap();
        assert_eq!(
            decode_snapshot(&bytes).unwrap(),
            vec![
                SnapshotFrame::Begin(header.clone()),
                SnapshotFrame::Slot(claim),
                SnapshotFrame::End { items: 1 }
            ]
        );
        assert!(matches!(
            decode_snapshot(&bytes[..without_end]),
            Err(SnapshotError::Structure { .. })
        ));
        let mut trailing = bytes.clone();
        trailing.push(0);
        assert!(decode_snapshot(&trailing).is_err());
        let mut miscounted = bytes[..without_end].to_vec();
        write_snapshot_frame(&mut miscounted, &SnapshotFrameRef::End { items: 2 }).unwrap();
        assert!(decode_snapshot(&miscounted).is_err());
        assert!(
            decode_snapshot(&[]).is_err(),
            "an empty file is not a snapshot"
        );
    }
}
